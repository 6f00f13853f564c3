"""Loading splits: the vendored GLUE copies, --data-dir, user files, the hub, and bad input."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from lorafit.data import custom_task, get_task, load_custom, load_split
from lorafit.errors import LorafitError

REPO = Path(__file__).resolve().parents[2]
SHARED_GLUE = REPO.parent / "shared" / "glue"
PACKAGE_SOURCES = REPO / "src" / "lorafit" / "data" / "glue" / "SOURCES.md"

needs_shared = pytest.mark.skipif(not SHARED_GLUE.is_dir(), reason="../shared/glue not present")


def _sha256_table(sources_md: Path) -> dict[str, str]:
    """``{"SST-2/train.tsv": sha256}`` from the file table of a SOURCES.md."""
    table = {}
    for match in re.finditer(
        r"^\| `([\w-]+/\w+\.tsv)` \| [\d,]+ \| [\d,]+ \| `([0-9a-f]{64})`", sources_md.read_text(), re.MULTILINE
    ):
        table[match.group(1)] = match.group(2)
    return table


# --------------------------------------------------------------------------------------------
# The vendored files

# (task, split, rows, label counts in label-id order)
VENDORED_COUNTS = [
    ("sst2", "train", 67_349, [29_780, 37_569]),
    ("sst2", "validation", 872, [428, 444]),
    ("mrpc", "train", 3_668, [1_194, 2_474]),
    ("mrpc", "validation", 408, [129, 279]),
    ("rte", "train", 2_490, [1_249, 1_241]),
    ("rte", "validation", 277, [146, 131]),
    ("cola", "train", 8_551, [2_528, 6_023]),
    ("cola", "validation", 1_043, [322, 721]),
]
GLUE_FILE = {"train": "train.tsv", "validation": "dev.tsv"}


@pytest.mark.parametrize(("task", "split", "rows", "counts"), VENDORED_COUNTS)
def test_vendored_classification_sizes_and_label_balance(
    task: str, split: str, rows: int, counts: list[int]
) -> None:
    data = load_split(task, split)
    assert len(data) == rows == len(data.text_a) == len(data.labels)
    assert data.labels.dtype == np.int64
    assert np.bincount(data.labels).tolist() == counts
    assert "vendored" in data.source
    spec = get_task(task)
    assert (data.text_b is None) == (len(spec.text_fields) == 1)


@pytest.mark.parametrize(("split", "rows", "mean"), [("train", 5_749, 2.701), ("validation", 1_500, 2.364)])
def test_vendored_stsb_scores(split: str, rows: int, mean: float) -> None:
    data = load_split("STS-B", split)
    assert len(data) == rows
    assert data.labels.dtype == np.float32
    assert data.labels.min() >= 0.0 and data.labels.max() <= 5.0
    assert round(float(data.labels.mean()), 3) == mean


@pytest.mark.parametrize(
    ("task", "split"), [(t, s) for t in ("sst2", "mrpc", "rte", "cola", "stsb") for s in GLUE_FILE]
)
def test_vendored_checksum_matches_sources_md(task: str, split: str) -> None:
    spec = get_task(task)
    key = f"{spec.glue_dir}/{GLUE_FILE[split]}"
    checksum = load_split(spec, split).checksum
    assert checksum == _sha256_table(PACKAGE_SOURCES)[key]
    if SHARED_GLUE.is_dir():
        # Independent of the package: the staged SOURCES.md and the staged bytes themselves.
        assert checksum == _sha256_table(SHARED_GLUE / "SOURCES.md")[key]
        assert checksum == hashlib.sha256((SHARED_GLUE / key).read_bytes()).hexdigest()


def test_package_sources_md_lists_every_vendored_file() -> None:
    assert len(_sha256_table(PACKAGE_SOURCES)) == 15  # train, dev and test of five tasks
    assert (PACKAGE_SOURCES.parent / "STS-B" / "LICENSE.txt").is_file()


def test_first_rows_match_sources_md_spot_checks() -> None:
    sst2 = load_split("sst2", "train")
    # The space before the tab is part of the GLUE text and must survive.
    assert sst2.text_a[0] == "hide new secretions from the parental units "
    assert sst2.labels[0] == 0
    sst2_dev = load_split("sst2", "validation")
    assert sst2_dev.text_a[0] == "it 's a charming and often affecting journey . "
    assert sst2_dev.labels[0] == 1

    rte = load_split("rte", "train")
    assert rte.text_a[0] == "No Weapons of Mass Destruction Found in Iraq Yet."
    assert rte.text_b is not None and rte.text_b[0] == "Weapons of Mass Destruction Found in Iraq."
    assert rte.labels[0] == 1  # not_entailment
    assert (
        load_split("rte", "validation")
        .text_a[0]
        .startswith("Dana Reeve, the widow of the actor Christopher Reeve,")
    )

    cola = load_split("cola", "train")
    assert cola.text_a[0] == "Our friends won't buy this analysis, let alone the next one we propose."
    assert cola.labels[0] == 1
    # CoLA dev has no final newline: the last row must still be there, intact.
    cola_dev = load_split("cola", "validation")
    assert cola_dev.text_a[-1] == "John talked to Bill about himself."

    stsb = load_split("stsb", "validation")
    assert stsb.text_a[0] == "A man with a hard hat is dancing."
    assert stsb.text_b is not None and stsb.text_b[0] == "A man wearing a hard hat is dancing."
    assert stsb.labels[0] == pytest.approx(5.0)

    mrpc = load_split("mrpc", "train")
    # Quotes are text (quoting off), and the BOM does not leak into anything.
    assert mrpc.text_a[0].startswith('Amrozi accused his brother , whom he called " the witness " ,')
    assert mrpc.labels[0] == 1
    assert not any("\ufeff" in t for t in mrpc.text_a[:1] + (mrpc.text_b or [])[:1])


@needs_shared
@pytest.mark.parametrize("task", ["sst2", "mrpc", "cola"])
def test_data_dir_on_staged_glue_equals_vendored(task: str) -> None:
    for split in ("train", "validation"):
        vendored = load_split(task, split)
        from_dir = load_split(task, split, data_dir=SHARED_GLUE)
        assert from_dir.checksum == vendored.checksum
        assert from_dir.text_a == vendored.text_a and from_dir.text_b == vendored.text_b
        assert np.array_equal(from_dir.labels, vendored.labels)
        assert str(SHARED_GLUE) in from_dir.source


@needs_shared
def test_qnli_dev_from_staged_data_dir() -> None:
    dev = load_split("QNLI", "dev", data_dir=SHARED_GLUE)
    assert dev.split == "validation"
    assert len(dev) == 5_463
    assert np.bincount(dev.labels).tolist() == [2_702, 2_761]
    assert dev.text_a[0] == "What came into force after the new constitution was herald?"


# --------------------------------------------------------------------------------------------
# --data-dir with a GLUE layout written here

MNLI_TRAIN_HEADER = (
    "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
    "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label"
)
MNLI_DEV_HEADER = (
    "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
    "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label"
)


def _mnli_row(i: int, premise: str, hypothesis: str, labels: list[str], gold: str) -> str:
    parse = "( ( x ) ( y ) )"
    return "\t".join(
        [
            str(i),
            str(100 + i),
            f"{100 + i}e",
            "fiction",
            parse,
            parse,
            f"(ROOT {parse})",
            f"(ROOT {parse})",
            premise,
            hypothesis,
            *labels,
            gold,
        ]
    )


def _write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture()
def glue_dir(tmp_path: Path) -> Path:
    root = tmp_path / "glue_data"
    _write(
        root / "MNLI" / "train.tsv",
        [
            MNLI_TRAIN_HEADER,
            _mnli_row(
                0,
                "Conceptually cream skimming has two basic dimensions.",
                "Product and geography are what make cream skimming work. ",
                ["neutral"],
                "neutral",
            ),
            _mnli_row(1, 'He said "yes" .', "He agreed.", ["entailment"], "entailment"),
            _mnli_row(2, "The cat sat.", "No cat sat.", ["contradiction"], "contradiction"),
        ],
    )
    for name, rows in {
        "dev_matched.tsv": [
            ("The new rights are nice enough", "Everyone really likes the newest benefits ", "neutral"),
            ("This site includes a list.", "The site has a list.", "entailment"),
        ],
        "dev_mismatched.tsv": [
            ("Your contribution helped.", "Your contribution did nothing.", "contradiction")
        ],
    }.items():
        _write(
            root / "MNLI" / name,
            [MNLI_DEV_HEADER]
            + [_mnli_row(i, p, h, [g, g, "neutral", g, g], g) for i, (p, h, g) in enumerate(rows)],
        )
    qqp_header = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate"
    _write(
        root / "QQP" / "train.tsv",
        [
            qqp_header,
            ("133273\t213221\t213222\tHow is the life of a math student?\t"
            "Which level of prepration is enough?\t0"),
            ('402555\t536040\t536041\tHow do I control my "horny" emotions?\t'
            "How do you control your horniness?\t1"),
        ],
    )
    _write(
        root / "QQP" / "dev.tsv",
        [
            qqp_header,
            ("201359\t303345\t303346\tWhy are African-Americans so beautiful?\t"
            "Why are hispanics so beautiful?\t0"),
        ],
    )
    qnli_header = "index\tquestion\tsentence\tlabel"
    _write(
        root / "QNLI" / "train.tsv",
        [
            qnli_header,
            ("0\tWhen did the third Digimon series begin?\t"
            "Unlike the two seasons before it, it was darker.\tnot_entailment"),
            ("1\tWhich missile batteries often have individual launchers?\t"
            "With batteries, the launchers are individual.\tentailment"),
        ],
    )
    _write(
        root / "QNLI" / "dev.tsv",
        [qnli_header, "0\tWhat came into force?\tThe constitution came into force.\tentailment"],
    )
    return root


def test_data_dir_mnli_three_labels_matched_and_mismatched(glue_dir: Path) -> None:
    train = load_split("MNLI", "train", data_dir=glue_dir)
    assert train.labels.tolist() == [1, 0, 2]  # neutral, entailment, contradiction in HF order
    assert train.text_a[1] == 'He said "yes" .'
    assert (
        train.text_b is not None
        and train.text_b[0] == "Product and geography are what make cream skimming work. "
    )
    matched = load_split("mnli", "validation_matched", data_dir=glue_dir)
    assert matched.split == "validation_matched"
    assert matched.labels.tolist() == [1, 0]
    assert matched.text_b == ["Everyone really likes the newest benefits ", "The site has a list."]
    mismatched = load_split("mnli", "dev_mismatched", data_dir=glue_dir)
    assert mismatched.split == "validation_mismatched"
    assert mismatched.labels.tolist() == [2]
    assert (
        mismatched.checksum
        == hashlib.sha256((glue_dir / "MNLI" / "dev_mismatched.tsv").read_bytes()).hexdigest()
    )


def test_data_dir_qqp_and_qnli(glue_dir: Path) -> None:
    qqp = load_split("qqp", "train", data_dir=glue_dir)
    assert qqp.labels.tolist() == [0, 1]
    assert qqp.text_a[1] == 'How do I control my "horny" emotions?'
    assert qqp.text_b == ["Which level of prepration is enough?", "How do you control your horniness?"]
    assert len(load_split("qqp", "validation", data_dir=glue_dir)) == 1
    qnli = load_split("qnli", "train", data_dir=glue_dir)
    assert qnli.labels.tolist() == [1, 0]
    assert qnli.text_a[0] == "When did the third Digimon series begin?"
    assert load_split("qnli", "validation", data_dir=glue_dir).labels.tolist() == [0]


def test_data_dir_tolerates_crlf(tmp_path: Path) -> None:
    path = tmp_path / "SST-2" / "dev.tsv"
    path.parent.mkdir()
    path.write_bytes(b"sentence\tlabel\r\ngood \t1\r\nbad \t0\r\n")
    data = load_split("sst2", "validation", data_dir=tmp_path)
    assert data.text_a == ["good ", "bad "] and data.labels.tolist() == [1, 0]


def test_unknown_split_is_an_error() -> None:
    with pytest.raises(LorafitError, match=r"unknown split 'test'.*mnli.*validation_matched"):
        load_split("mnli", "test")


# --------------------------------------------------------------------------------------------
# User files


def test_custom_csv_with_quoting(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text(
        'id,premise,hypothesis,label\n1,"A, quoted ""text""",plain,yes\n2,"two\nlines",x,no\n3,c,d,yes\n'
    )
    task = custom_task(path, ["premise", "hypothesis"], "label")
    assert task.label_names == ("no", "yes")
    data = load_custom(path, ["premise", "hypothesis"], "label", task)
    assert data.text_a == ['A, quoted "text"', "two\nlines", "c"]
    assert data.text_b == ["plain", "x", "d"]
    assert data.labels.tolist() == [1, 0, 1]
    assert data.split == "train"
    assert data.checksum == hashlib.sha256(path.read_bytes()).hexdigest()
    assert str(path) in data.source


def test_custom_jsonl_classification_and_regression(tmp_path: Path) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text(
        "\n".join(json.dumps(r) for r in [{"text": "a", "label": 1}, {"text": "b", "label": 0}]) + "\n\n"
    )
    task = custom_task(train, ["text"], "label")
    assert task.label_names == ("0", "1")
    dev = tmp_path / "dev.jsonl"
    dev.write_text(json.dumps({"text": "c", "label": "1", "extra": 3}) + "\n")
    data = load_custom(dev, ["text"], "label", task, split="validation")
    assert data.split == "validation" and data.labels.tolist() == [1] and data.text_b is None

    scores = tmp_path / "scores.jsonl"
    scores.write_text('{"s1": "x", "s2": "y", "score": 4.5}\n{"s1": "z", "s2": "w", "score": "0.25"}\n')
    reg = custom_task(scores, ["s1", "s2"], "score", regression=True)
    data = load_custom(scores, ["s1", "s2"], "score", reg)
    assert data.labels.dtype == np.float32 and data.labels.tolist() == [4.5, 0.25]


def test_custom_tsv_reads_quotes_as_text(tmp_path: Path) -> None:
    path = tmp_path / "train.tsv"
    path.write_text('sentence\tlabel\n" open quote\tb\nc "\ta\n')
    task = custom_task(path, ["sentence"], "label")
    assert load_custom(path, ["sentence"], "label", task).text_a == ['" open quote', 'c "']


# --------------------------------------------------------------------------------------------
# The hub path, offline only


@pytest.mark.parametrize(
    ("task", "split"), [("qnli", "train"), ("mnli", "validation_matched"), ("qqp", "validation")]
)
def test_hub_offline_fails_immediately_with_both_options(
    monkeypatch: pytest.MonkeyPatch, task: str, split: str
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LorafitError) as err:
        load_split(task, split)
    message = str(err.value)
    assert "not vendored" in message and "unreachable" in message and "HF_HUB_OFFLINE" in message
    assert "--data-dir" in message and "--train-file/--validation-file" in message


def test_hub_without_datasets_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(LorafitError, match=r"not vendored.*'datasets' package is not installed.*--data-dir"):
        load_split("qnli", "train")


def test_hub_unreachable_fails_fast_without_offline_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("datasets")
    import lorafit.hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(lorafit.hub, "hub_reachable", lambda *args, **kwargs: False)
    with pytest.raises(LorafitError, match=r"not vendored.*no connection to the hub.*--data-dir"):
        load_split("mnli", "train")


# --------------------------------------------------------------------------------------------
# Bad input: one LorafitError naming the file, the line where one applies, and what was expected


def _sst2_dir(tmp_path: Path, content: bytes, split_file: str = "train.tsv") -> Path:
    path = tmp_path / "SST-2" / split_file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_error_missing_file_names_path_and_layout(glue_dir: Path) -> None:
    (glue_dir / "MNLI" / "dev_matched.tsv").unlink()
    with pytest.raises(LorafitError) as err:
        load_split("mnli", "validation_matched", data_dir=glue_dir)
    message = str(err.value)
    assert str(glue_dir / "MNLI" / "dev_matched.tsv") in message
    assert "not found" in message and "GLUE layout" in message and "dev_mismatched.tsv" in message


def test_error_missing_data_dir(tmp_path: Path) -> None:
    with pytest.raises(LorafitError, match=r"nowhere.*--data-dir folder not found"):
        load_split("rte", "train", data_dir=tmp_path / "nowhere")


def test_error_missing_custom_file(tmp_path: Path) -> None:
    task = custom_task(tmp_path / "x.csv", ["t"], "l", label_names=["a", "b"])
    with pytest.raises(LorafitError, match=re.escape(str(tmp_path / "missing.csv")) + ": file not found"):
        load_custom(tmp_path / "missing.csv", ["t"], "l", task)


def test_error_missing_column_names_column_and_columns_present(tmp_path: Path) -> None:
    path = tmp_path / "RTE" / "train.tsv"
    path.parent.mkdir()
    path.write_text("index\tsentence1\tsentence2\tgold\n0\ta\tb\tentailment\n")
    with pytest.raises(LorafitError) as err:
        load_split("rte", "train", data_dir=tmp_path)
    message = str(err.value)
    assert str(path) in message
    assert "missing column 'label'" in message
    assert "'index', 'sentence1', 'sentence2', 'gold'" in message


def test_error_missing_column_in_jsonl_names_line(tmp_path: Path) -> None:
    path = tmp_path / "dev.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"txt": "b", "label": "x"}\n')
    task = custom_task(path, ["text"], "label", label_names=["x", "y"])
    with pytest.raises(
        LorafitError,
        match=re.escape(str(path)) + r" line 2: missing column 'text'; columns present: 'txt', 'label'",
    ):
        load_custom(path, ["text"], "label", task)


def test_error_unknown_label_names_value_line_and_allowed(tmp_path: Path) -> None:
    path = _sst2_dir(tmp_path, b"sentence\tlabel\ngood \t1\nodd \t2\n")
    with pytest.raises(LorafitError) as err:
        load_split("sst2", "train", data_dir=tmp_path)
    assert str(err.value) == f"{path} line 3: unknown label '2' in column 'label'; allowed labels: '0', '1'"


def test_error_unknown_label_in_custom_validation_file(tmp_path: Path) -> None:
    train = tmp_path / "train.csv"
    train.write_text("text,label\na,pos\nb,neg\n")
    dev = tmp_path / "dev.csv"
    dev.write_text("text,label\nc,pos\nd,neutral\n")
    task = custom_task(train, ["text"], "label")
    with pytest.raises(
        LorafitError, match=re.escape(str(dev)) + r" line 3: unknown label 'neutral'.*'neg', 'pos'"
    ):
        load_custom(dev, ["text"], "label", task, split="validation")


def test_error_bad_regression_score(tmp_path: Path) -> None:
    path = tmp_path / "STS-B" / "dev.tsv"
    path.parent.mkdir()
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    path.write_text(
        f"{header}\n0\tg\tf\t2012\t1\tnone\tnone\ta\tb\t5.000\n1\tg\tf\t2012\t2\tnone\tnone\tc\td\tn/a\n"
    )
    with pytest.raises(
        LorafitError,
        match=re.escape(str(path)) + r" line 3: expected a finite number in column 'score', got 'n/a'",
    ):
        load_split("stsb", "validation", data_dir=tmp_path)


@pytest.mark.parametrize("content", [b"", b"\n\n", "\ufeff".encode()])
def test_error_empty_file(tmp_path: Path, content: bytes) -> None:
    path = _sst2_dir(tmp_path, content)
    with pytest.raises(LorafitError, match=re.escape(str(path)) + ": file is empty"):
        load_split("sst2", "train", data_dir=tmp_path)


def test_error_header_without_rows(tmp_path: Path) -> None:
    path = _sst2_dir(tmp_path, b"sentence\tlabel\n")
    with pytest.raises(LorafitError, match=re.escape(str(path)) + ": no data rows"):
        load_split("sst2", "train", data_dir=tmp_path)


def test_error_empty_custom_files(tmp_path: Path) -> None:
    task = custom_task(tmp_path / "x.csv", ["t"], "l", label_names=["a", "b"])
    for name, content in [("e.csv", ""), ("e.jsonl", "\n"), ("h.csv", "t,l\n")]:
        path = tmp_path / name
        path.write_text(content)
        with pytest.raises(LorafitError, match=re.escape(str(path)) + ": (file is empty|no data rows)"):
            load_custom(path, ["t"], "l", task)


def test_error_wrong_number_of_fields(tmp_path: Path) -> None:
    # A tab inside a sentence is the usual way this happens.
    path = _sst2_dir(tmp_path, b"sentence\tlabel\ngood \t1\nbad\there \t0\n")
    with pytest.raises(LorafitError) as err:
        load_split("sst2", "train", data_dir=tmp_path)
    assert str(err.value) == f"{path} line 3: expected 2 tab-separated fields, got 3"


def test_error_wrong_number_of_fields_cola_without_header(tmp_path: Path) -> None:
    path = tmp_path / "CoLA" / "dev.tsv"
    path.parent.mkdir()
    path.write_text("gj04\t1\t\tFine.\ngj04\t0\tBroken.")
    with pytest.raises(
        LorafitError, match=re.escape(str(path)) + r" line 2: expected 4 tab-separated fields, got 3"
    ):
        load_split("cola", "validation", data_dir=tmp_path)


def test_error_wrong_number_of_fields_csv(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text("text,label\na,x\nb,c,y\n")
    with pytest.raises(
        LorafitError, match=re.escape(str(path)) + r" line 3: expected 2 comma-separated fields, got 3"
    ):
        custom_task(path, ["text"], "label")


@pytest.mark.parametrize("name, content, line", [
    ("train.csv", "text,label\nhello,1\nbye,\nhi,0\n", 3),
    ("train.tsv", "text\tlabel\nhello\t1\nbye\t \n", 3),
    ("train.jsonl", '{"text": "hello", "label": 1}\n{"text": "bye", "label": ""}\n', 2),
])
def test_error_an_empty_label_is_not_a_class(tmp_path: Path, name: str, content: str, line: int) -> None:
    # It used to become a class named "", and training started with one class too many.
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(LorafitError, match=re.escape(f"{path} line {line}: column 'label' is empty; every example needs a label")):
        custom_task(path, ["text"], "label")


def test_error_an_empty_label_in_a_validation_or_regression_file(tmp_path: Path) -> None:
    good, bad = tmp_path / "train.csv", tmp_path / "dev.csv"
    good.write_text("text,label\nhello,1\nbye,0\n")
    bad.write_text("text,label\nhello,1\nbye, \n")
    for task in (custom_task(good, ["text"], "label"), custom_task(good, ["text"], "label", regression=True)):
        with pytest.raises(LorafitError, match=re.escape(f"{bad} line 3: column 'label' is empty")):
            load_custom(bad, ["text"], "label", task, split="validation")


def test_error_a_column_named_twice(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text("text,text,label,note,note\na,b,1,x,y\nc,d,0,x,y\n")
    with pytest.raises(LorafitError, match=re.escape(f"{path}: column 'text' appears 2 times in the header; rename all but one")):
        load_custom(path, ["text"], "label", custom_task(path, ["text"], "label"))
    # A repeated column that is not read is no one's concern.
    path.write_text("text,label,note,note\na,1,x,y\nc,0,x,y\n")
    assert len(load_custom(path, ["text"], "label", custom_task(path, ["text"], "label"))) == 2


def test_error_undecodable_bytes_names_line(tmp_path: Path) -> None:
    path = _sst2_dir(tmp_path, b"sentence\tlabel\ngood \t1\ncaf\xe9 \t1\n")
    with pytest.raises(LorafitError) as err:
        load_split("sst2", "train", data_dir=tmp_path)
    message = str(err.value)
    assert message.startswith(f"{path} line 3: ")
    assert "UTF-8" in message


def test_error_undecodable_custom_file(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"t": "a", "l": "x"}\n{"t": "\xff", "l": "y"}\n')
    with pytest.raises(LorafitError, match=re.escape(str(path)) + r" line 2: .*UTF-8"):
        custom_task(path, ["t"], "l")


def test_error_invalid_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"t": "a", "l": "x"}\n{"t": "b", "l": \n')
    with pytest.raises(LorafitError, match=re.escape(str(path)) + r" line 2: invalid JSON"):
        custom_task(path, ["t"], "l")
    path.write_text('{"t": 5, "l": "x"}\n')
    task = custom_task(tmp_path / "x.csv", ["t"], "l", label_names=["x", "y"])
    with pytest.raises(LorafitError, match=r"line 1: column 't': expected a string, got int"):
        load_custom(path, ["t"], "l", task)


def test_error_unsupported_extension(tmp_path: Path) -> None:
    path = tmp_path / "train.xlsx"
    path.write_bytes(b"x")
    with pytest.raises(LorafitError, match=r"train\.xlsx: unsupported file type '\.xlsx'"):
        custom_task(path, ["t"], "l")
