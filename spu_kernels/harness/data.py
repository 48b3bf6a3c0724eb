"""Data for the fine-tuning harness: the built-in Rotten Tomatoes set, CSV / JSONL files, and
Hugging Face ``datasets`` names.

Rotten Tomatoes sentence polarity (Pang & Lee), offline
--------------------------------------------------------
The sentences come from ``movieReviewSnippets_GroundTruth.txt`` inside
``additional_resources/hutto_ICWSM_2014.tar.gz`` of the vaderSentiment 3.3.2 *source* archive on
PyPI (Hutto & Gilbert, ICWSM 2014). ``fetch_rotten_tomatoes()`` runs
``python -m pip download --no-deps --no-binary :all: vaderSentiment==3.3.2`` into the cache
(``$SPU_DATA_DIR``, default ``~/.cache/spu_kernels/data``), extracts the inner tarball, parses the
file and writes ``rotten_tomatoes.jsonl`` there (``make data`` does this once; nothing else needs
the network). The file has 10,605 lines ``ID<TAB>MEAN-SENTIMENT-RATING<TAB>SENTENCE`` (UTF-8, CRLF
line ends, no header, no final newline); ids run 1..10605 in order; the rating is the mean of about
20 human ratings on -4..+4.

Labels (1 = positive, 0 = negative). The file carries no polarity label, only the human rating,
and the sentences come from the Pang & Lee positive and negative files in blocks. The guess "ids
1-5331 are the positive file" (Pang & Lee's 5,331 positive sentences) does not hold: the sign of
the rating agrees with it on only 94.3% of the 10,568 sentences with a non-zero rating, and
the positives end at id 5152, where the rating changes sign abruptly. A change-point fit (fewest
sign disagreements plus a penalty per block; the same blocks for any penalty from 3 to 15) finds
six blocks:

    positive: 1-5152, 10313-10347, 10379-10481        (5,290 sentences)
    negative: 5153-10312, 10348-10378, 10482-10605    (5,315 sentences)

With these source labels the rating's sign agrees on 97.2% (10,273 of 10,568; 37 ratings are
exactly 0) -- the rest are sentences whose raters disagree with the review they came from, as in
the original set. ``label_agreement()`` recomputes this; ``prepare`` refuses a file where it is
below 95%. ``labels: score`` in a config uses the rating's sign instead (zero-rated sentences are
dropped).

Splits: a fixed, seeded shuffle (``random.Random(split_seed)``) of the whole set, then 80% train /
10% validation / 10% test (8,484 / 1,060 / 1,061 sentences for the source labels); ``n_train``,
``n_val`` and ``n_test`` take the first n of each split (so a subset is a prefix of the full split,
and the test sentences never change with ``n_train``).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import random
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

VADER_SPEC = "vaderSentiment==3.3.2"
VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
INNER_TARBALL = "additional_resources/hutto_ICWSM_2014.tar.gz"
GROUND_TRUTH = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
PROCESSED = "rotten_tomatoes.jsonl"
N_SENTENCES = 10605
# id ranges (inclusive) that came from the positive file; everything else is negative (docstring)
POSITIVE_ID_RANGES = ((1, 5152), (10313, 10347), (10379, 10481))
MIN_AGREEMENT = 0.95
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
BUILTIN = ("rotten_tomatoes",)


@dataclass
class Example:
    text: str
    label: int
    origin: str = field(default="", compare=False, repr=False)     # "file line N", for error messages


@dataclass
class Splits:
    train: list[Example]
    val: list[Example]
    test: list[Example]
    label_names: list[str]
    source: str

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def data_dir() -> Path:
    return Path(os.environ.get("SPU_DATA_DIR") or Path.home() / ".cache" / "spu_kernels" / "data")


# --------------------------------------------------------------------------------------------
# Rotten Tomatoes
# --------------------------------------------------------------------------------------------
def source_label(sid: int) -> int:
    return int(any(lo <= sid <= hi for lo, hi in POSITIVE_ID_RANGES))


def parse_ground_truth(text: str) -> list[dict]:
    """Rows {id, score, text} of movieReviewSnippets_GroundTruth.txt (format: module docstring)."""
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise ValueError(f"{GROUND_TRUTH} line {lineno}: expected ID<TAB>RATING<TAB>SENTENCE, got {line[:80]!r}")
        try:
            sid, score = int(parts[0]), float(parts[1])
        except ValueError:
            raise ValueError(f"{GROUND_TRUTH} line {lineno}: bad id or rating in {line[:80]!r}") from None
        rows.append({"id": sid, "score": score, "text": parts[2].strip()})
    return rows


def label_agreement(rows: list[dict]) -> tuple[int, int]:
    """(agreeing, counted): sentences with a non-zero rating whose sign matches the source label."""
    counted = [r for r in rows if r["score"] != 0]
    agree = sum((r["score"] > 0) == bool(source_label(r["id"])) for r in counted)
    return agree, len(counted)


def read_sdist(sdist: str | Path, check: bool = True) -> list[dict]:
    """Parse the ground-truth file out of the vaderSentiment source archive: rows with id, score,
    text and label (source label). ``check`` enforces the label/rating agreement."""
    with tarfile.open(sdist, "r:gz") as outer:
        member = next((m for m in outer.getmembers() if m.name.endswith(INNER_TARBALL)), None)
        if member is None:
            raise ValueError(f"{sdist} has no {INNER_TARBALL}")
        inner_bytes = outer.extractfile(member).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        member = next((m for m in inner.getmembers() if m.name.endswith(GROUND_TRUTH.split("/")[-1])), None)
        if member is None:
            raise ValueError(f"{INNER_TARBALL} in {sdist} has no {GROUND_TRUTH}")
        text = inner.extractfile(member).read().decode("utf-8")
    rows = parse_ground_truth(text)
    for r in rows:
        r["label"] = source_label(r["id"])
    if check:
        agree, counted = label_agreement(rows)
        if counted == 0 or agree / counted < MIN_AGREEMENT:
            raise ValueError(f"{sdist}: the derived labels agree with the human rating's sign on only "
                             f"{agree}/{counted} sentences (< {MIN_AGREEMENT:.0%}); is this vaderSentiment 3.3.2?")
    return rows


def fetch_rotten_tomatoes(cache: str | Path | None = None, quiet: bool = False) -> Path:
    """Download (once) and prepare the Rotten Tomatoes set; returns the processed JSONL path."""
    cache = Path(cache) if cache else data_dir()
    out = cache / PROCESSED
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / ".fetch.lock"):   # the processes of a torchrun launch: one fetches, the others wait
        if out.exists():
            return out
        return _fetch(cache, out, quiet)


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path`` between processes (POSIX flock; none where there is no fcntl)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fetch(cache: Path, out: Path, quiet: bool) -> Path:
    sdist = cache / VADER_SDIST
    if not sdist.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", VADER_SPEC,
               "-d", str(cache)]
        if not quiet:
            print(f"spu_kernels: fetching the Rotten Tomatoes sentences: {' '.join(cmd[2:])}", file=sys.stderr)
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0 or not sdist.exists():
            raise RuntimeError(f"could not download {VADER_SPEC} from PyPI into {cache} "
                               f"(pip exit {res.returncode}): {res.stderr.strip()[-800:]}\n"
                               f"Put {VADER_SDIST} there by hand, or use a CSV/JSONL dataset (dataset.path).")
    rows = read_sdist(sdist)
    tmp = out.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(out)
    agree, counted = label_agreement(rows)
    if not quiet:
        print(f"spu_kernels: {len(rows)} sentences -> {out} (labels agree with the rating's sign on "
              f"{agree}/{counted} = {agree / counted:.1%})", file=sys.stderr)
    return out


def load_rotten_tomatoes(labels: str = "source", cache: str | Path | None = None) -> list[Example]:
    path = fetch_rotten_tomatoes(cache)
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    if labels == "source":
        return [Example(r["text"], int(r["label"])) for r in rows]
    if labels == "score":
        return [Example(r["text"], int(r["score"] > 0)) for r in rows if r["score"] != 0]
    raise ValueError(f"dataset.labels must be 'source' or 'score', got {labels!r}")


# --------------------------------------------------------------------------------------------
# files and Hugging Face datasets
# --------------------------------------------------------------------------------------------
def _records_from_file(path: Path) -> list[tuple[str, dict]]:
    """(origin "PATH line N", record) per row of a JSONL / CSV / TSV file (UTF-8)."""
    try:
        return _read_records(path)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None


def _read_records(path: Path) -> list[tuple[str, dict]]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        out = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path} line {lineno}: not JSON ({e.msg}); expected one object per "
                                         "line") from None
                    if not isinstance(record, dict):
                        raise ValueError(f"{path} line {lineno}: expected a JSON object, got {line.strip()[:80]}")
                    out.append((f"{path} line {lineno}", record))
        return out
    if suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            out = [(f"{path} line {reader.line_num}", row) for row in reader]
        n_header = len(reader.fieldnames or ())
        for origin, row in out:            # DictReader fills a short row with None, puts extra fields under None
            n = n_header - sum(v is None for k, v in row.items() if k is not None) + len(row.get(None) or ())
            if n != n_header:
                raise ValueError(f"{origin}: {n} field(s) but the header has {n_header} "
                                 f"({', '.join(reader.fieldnames)}); fix the row (a missing or unquoted "
                                 "delimiter?) or drop it")
        return out
    raise ValueError(f"dataset.path {path}: unsupported file type {suffix!r} (use .csv, .tsv or .jsonl)")


def _as_int(v) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, str) and re.fullmatch(r"-?[0-9]+", v.strip()):    # ASCII digits only: not '³', not '--3'
        return int(v)
    return None


def _field(record: dict, column: str, origin: str, empty_ok: bool = False):
    """``record[column]``; missing, null or (unless ``empty_ok``) empty is an error naming ``origin``."""
    if column not in record:
        raise ValueError(f"{origin}: no {column!r} field; every row needs one (fill it in or drop the row)")
    value = record[column]
    if value is None or (isinstance(value, str) and not value.strip() and not empty_ok):
        raise ValueError(f"{origin}: the {column!r} field is {'null' if value is None else 'empty'}; every row "
                         "needs one (fill it in or drop the row)")
    return value


def is_int_labels(label_names: list[str]) -> bool:
    """Integer labels (class ids as they are) rather than strings mapped to ids in sorted order."""
    return label_names == [str(i) for i in range(len(label_names))]


def _label_names(raw: list, origins: list[str]) -> list[str]:
    """The label map a training split defines: "0".."C-1" for integer labels, else its strings sorted."""
    ints = [_as_int(v) for v in raw]
    if not all(i is not None for i in ints):
        return sorted({str(v) for v in raw})
    neg = next((k for k, i in enumerate(ints) if i < 0), None)
    if neg is not None:
        raise ValueError(f"{origins[neg]}: label {ints[neg]} is negative; integer labels are class ids 0..C-1, "
                         "and -1 often marks an unlabelled row: drop those rows, or map the labels to 0..C-1 "
                         "(e.g. -1/+1 -> 0/1)")
    return [str(i) for i in range(max(ints) + 1)]


def _label_id(value, label_names: list[str], origin: str) -> int:
    """``value``'s class id under the training split's label map."""
    if is_int_labels(label_names):
        i = _as_int(value)
        if i is None or i < 0:
            what = "negative" if i is not None else "not an integer"
            raise ValueError(f"{origin}: label {value!r} is {what}, but the training split's labels are the class "
                             f"ids 0..{len(label_names) - 1}; every split must use them")
        return i                          # checked against num_labels by check_labels
    try:
        return label_names.index(str(value))
    except ValueError:
        raise ValueError(f"{origin}: label {value!r} is not one of the training split's labels {label_names}; "
                         "every split must use the training split's labels (fix or drop the row)") from None


def _to_examples(rows: list[tuple[str, dict]], text_column: str, label_column: str, where: str,
                 label_names: list[str] | None) -> tuple[list[Example], list[str]]:
    """Examples of (origin, record) rows. ``label_names`` None: this is the training split, whose
    labels define the map; otherwise the training split's map, applied to these rows."""
    if not rows:
        raise ValueError(f"{where}: no rows")
    first = rows[0][1]
    for col in (text_column, label_column):
        if col not in first:
            raise ValueError(f"{where}: no column {col!r}; columns are {sorted(k for k in first if k is not None)} "
                             f"(set dataset.text_column / dataset.label_column)")
    texts = [_field(r, text_column, origin, empty_ok=True) for origin, r in rows]
    raw = [_field(r, label_column, origin) for origin, r in rows]
    origins = [origin for origin, _ in rows]
    if label_names is None:
        label_names = _label_names(raw, origins)
    return ([Example(str(t), _label_id(v, label_names, o), o) for t, v, o in zip(texts, raw, origins)],
            label_names)


def load_file(path: str | Path, text_column: str = "text", label_column: str = "label",
              label_names: list[str] | None = None) -> tuple[list[Example], list[str]]:
    """A CSV / TSV (header row) or JSONL file with a text and a label column. Labels may be ints
    0..C-1 or strings (mapped to 0..C-1 in sorted order); ``label_names`` (the training split's)
    maps the labels of a validation or test file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"dataset.path: {path} does not exist")
    return _to_examples(_records_from_file(path), text_column, label_column, str(path), label_names)


def load_hf(name: str, config: str | None, text_column: str, label_column: str,
            train_split: str = "train") -> tuple[dict[str, list[Example]], list[str]]:
    """A Hugging Face ``datasets`` dataset (needs the optional ``datasets`` package, and the data
    cached locally or the Hub reachable). Returns its splits by name and the label names (the
    training split's label map, applied to every split)."""
    try:
        import datasets
    except ImportError:
        raise ImportError(f"dataset.hf: {name!r} needs the Hugging Face `datasets` package, which is not "
                          "installed (pip install datasets); or export the data to CSV/JSONL and use "
                          "dataset.path") from None
    ds = datasets.load_dataset(name, config)
    out, label_names = {}, None
    for split_name in sorted(ds, key=lambda s: s != train_split):     # the training split first
        rows = [(f"{name}[{split_name}] row {i}", r) for i, r in enumerate(ds[split_name])]
        out[split_name], label_names = _to_examples(rows, text_column, label_column, f"{name}[{split_name}]",
                                                    label_names)
    class_names = getattr(ds[next(iter(out))].features.get(label_column), "names", None)
    if class_names and is_int_labels(label_names) and len(class_names) >= len(label_names):
        label_names = list(class_names)            # a ClassLabel: its names and its class count
    return out, label_names


def check_labels(splits: "Splits", num_labels: int | None = None) -> int:
    """The number of classes (``num_labels``, i.e. model.num_labels, or the training split's);
    a label outside 0..num_labels-1 in any split is an error naming its file and line."""
    n = num_labels or splits.num_labels
    why = ("model.num_labels" if num_labels else
           f"the training split's labels are 0..{n - 1}" if is_int_labels(splits.label_names) else
           f"the training split's labels are {splits.label_names}")
    for split_name, split in (("training", splits.train), ("validation", splits.val), ("test", splits.test)):
        bad = next((e for e in split if not 0 <= e.label < n), None)
        if bad is not None:
            name = splits.label_names[bad.label] if 0 <= bad.label < len(splits.label_names) else str(bad.label)
            label = bad.label if name == str(bad.label) else f"{name!r} (class id {bad.label})"
            raise ValueError(f"{bad.origin or f'the {split_name} split'}: label {label} is not below num_labels = {n} "
                             f"({why}); "
                             "set model.num_labels to the number of classes, or fix or drop the row")
    return n


# --------------------------------------------------------------------------------------------
# splitting
# --------------------------------------------------------------------------------------------
def split_examples(examples: list[Example], seed: int) -> tuple[list[Example], list[Example], list[Example]]:
    """Seeded shuffle, then 80/10/10."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n = len(order)
    n_train = int(round(n * SPLIT_FRACTIONS[0]))
    n_val = int(round(n * SPLIT_FRACTIONS[1]))
    pick = lambda idx: [examples[i] for i in idx]
    return pick(order[:n_train]), pick(order[n_train:n_train + n_val]), pick(order[n_train + n_val:])


def _head(xs: list, n: int | None) -> list:
    return xs if n is None else xs[:n]


def load_splits(ds) -> Splits:
    """The train / val / test examples a ``DatasetConfig`` describes."""
    if ds.name is not None:
        if ds.name not in BUILTIN:
            raise ValueError(f"dataset.name: unknown built-in dataset {ds.name!r}; built-in: {', '.join(BUILTIN)} "
                             "(use dataset.path for a CSV/JSONL file, dataset.hf for a Hugging Face dataset)")
        examples = load_rotten_tomatoes(ds.labels)
        train, val, test = split_examples(examples, ds.split_seed)
        label_names, source = ["negative", "positive"], f"rotten_tomatoes (vaderSentiment 3.3.2, {ds.labels} labels)"
    elif ds.path is not None:
        files = {"train": ds.path, "val": ds.val_path, "test": ds.test_path}
        main, label_names = load_file(ds.path, ds.text_column, ds.label_column)
        val, test = (load_file(p, ds.text_column, ds.label_column, label_names)[0] if p else None
                     for p in (ds.val_path, ds.test_path))
        train, v2, te2 = split_examples(main, ds.split_seed)
        if val is not None and test is not None:
            train = main
        elif val is not None or test is not None:     # the split not given is carved out of the training file
            train = train + (v2 if val is not None else te2)
        val, test = (v2 if val is None else val), (te2 if test is None else test)
        source = ", ".join(f"{k}={v}" for k, v in files.items() if v)
    else:
        splits, label_names = load_hf(ds.hf, ds.hf_config, ds.text_column, ds.label_column, ds.hf_splits[0])
        names = {"train": ds.hf_splits[0], "val": ds.hf_splits[1], "test": ds.hf_splits[2]}
        missing = [v for v in names.values() if v not in splits]
        if missing:
            raise ValueError(f"dataset.hf {ds.hf!r} has splits {sorted(splits)}, not {missing} "
                             "(set dataset.hf_splits: [train, validation, test])")
        train, val, test = (splits[names[k]] for k in ("train", "val", "test"))
        source = f"hf:{ds.hf}" + (f"/{ds.hf_config}" if ds.hf_config else "")
    train, val, test = _head(train, ds.n_train), _head(val, ds.n_val), _head(test, ds.n_test)
    for split_name, split in (("train", train), ("validation", val), ("test", test)):
        if not split:
            raise ValueError(f"the {split_name} split is empty ({source})")
    return Splits(train, val, test, label_names, source)


def main(argv=None) -> None:
    """``python -m spu_kernels.harness.data``: fetch and prepare the Rotten Tomatoes set."""
    import argparse
    ap = argparse.ArgumentParser(description="fetch and cache the Rotten Tomatoes sentences (vaderSentiment 3.3.2)")
    ap.add_argument("--dir", default=None, help=f"cache folder (default $SPU_DATA_DIR or {data_dir()})")
    args = ap.parse_args(argv)
    path = fetch_rotten_tomatoes(args.dir)
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    agree, counted = label_agreement(rows)
    pos = sum(r["label"] for r in rows)
    print(f"{path}: {len(rows)} sentences ({pos} positive, {len(rows) - pos} negative); labels agree with the "
          f"human rating's sign on {agree}/{counted} = {agree / counted:.1%}")


if __name__ == "__main__":
    main()
