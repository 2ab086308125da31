"""GLUE readers on every layout in ../shared/data/glue, plus bad rows reported with file:line."""

from __future__ import annotations

import pytest

from distilflow.tasks.evaluate.glue import (
    TASKS,
    find_task_files,
    get_task,
    read_glue_file,
    remove_overlap,
    split_examples,
)
from tests.conftest import SHARED

GLUE = SHARED / "glue"


@pytest.mark.parametrize("task, rel, layout, n, first", [
    ("sst2", "sst2/stsa.binary.train", "sst_binary", 6920, 1),
    ("sst2", "sst2/stsa.binary.dev", "sst_binary", 872, 0),
    ("sst2", "sst2/stsa.binary.test", "sst_binary", 1821, 0),
    ("sst2", "sst2/dev_glue_style.tsv", "glue_tsv", 872, 0),
    ("mrpc", "mrpc/dev.tsv", "glue_tsv", 408, 1),
    ("mrpc", "mrpc/msr_paraphrase_train.txt", "glue_tsv", 4076, 1),
    ("mrpc", "mrpc/msr_paraphrase_test.txt", "glue_tsv", 1725, 1),
    ("cola", "cola/dev_glue_style.tsv", "cola_raw", 1043, 1),
    ("cola", "cola/in_domain_dev.tsv", "cola_raw", 527, 1),
    ("cola", "cola/out_of_domain_dev.tsv", "cola_raw", 516, 1),
    ("stsb", "stsb/dev.tsv", "glue_tsv", 1500, 5.0),
    ("stsb", "stsb/sts-dev.tsv", "stsb_raw", 1500, 5.0),
    ("rte", "rte/dev.tsv", "glue_tsv", 277, 1),
])
def test_shared_files_read_completely(task, rel, layout, n, first):
    data = read_glue_file(str(GLUE / rel), task)
    assert data.layout == layout
    assert data.bad == []
    assert len(data) == n
    assert data.examples[0].label == first
    t = get_task(task)
    assert all((e.text_b is not None) == t.pair for e in data.examples)
    assert all(e.text_a.strip() == e.text_a and e.text_a for e in data.examples)
    if t.is_regression:
        assert all(isinstance(e.label, float) and 0.0 <= e.label <= 5.0 for e in data.examples)
    else:
        assert {e.label for e in data.examples} == set(range(t.num_labels))


def test_label_balance_matches_source_notes():
    # SOURCE.txt: SST-2 dev 444 pos / 428 neg; MRPC dev 279/129; CoLA in-domain dev 365/162; RTE 146 entailment
    def count(task, rel, label):
        return sum(e.label == label for e in read_glue_file(str(GLUE / rel), task).examples)

    assert count("sst2", "sst2/stsa.binary.dev", 1) == 444
    assert count("mrpc", "mrpc/dev.tsv", 1) == 279
    assert count("cola", "cola/in_domain_dev.tsv", 0) == 162
    assert count("rte", "rte/dev.tsv", 0) == 146  # 0 = entailment in the HF export


def test_mrpc_keeps_unbalanced_quotes_as_text():
    data = read_glue_file(str(GLUE / "mrpc/dev.tsv"), "mrpc")
    assert data.examples[0].text_b.startswith('"The foodservice pie business')


def test_sst_glue_tsv_and_stsa_have_the_same_dev_set():
    a = read_glue_file(str(GLUE / "sst2/dev_glue_style.tsv"), "sst2").examples
    b = read_glue_file(str(GLUE / "sst2/stsa.binary.dev"), "sst2").examples
    assert sorted((e.text_a, e.label) for e in a) == sorted((e.text_a, e.label) for e in b)


def test_cola_train_inside_the_official_zip():
    files = find_task_files(str(GLUE), "cola")
    assert files.train.startswith("zip://cola_public/raw/in_domain_train.tsv::")
    data = read_glue_file(files.train, "cola")
    assert len(data) == 8551 and data.bad == []


def test_find_task_files_and_mrpc_leak_removal():
    files = find_task_files(str(GLUE), "mrpc")
    assert files.train.endswith("msr_paraphrase_train.txt") and files.dev.endswith("dev.tsv")
    train = read_glue_file(files.train, "mrpc").examples
    dev = read_glue_file(files.dev, "mrpc").examples
    kept, dropped = remove_overlap(train, dev)
    assert dropped == 408  # the GLUE dev pairs are inside the MSR train file
    assert len(kept) == 4076 - 408
    assert find_task_files(str(GLUE), "rte").train is None  # dev only here
    with pytest.raises(FileNotFoundError, match="qqp"):
        find_task_files(str(GLUE), "qqp")


def test_split_examples_is_deterministic_and_disjoint():
    ex = read_glue_file(str(GLUE / "rte/dev.tsv"), "rte").examples
    a1, b1 = split_examples(ex, 0.5, seed=0)
    a2, b2 = split_examples(list(reversed(ex)), 0.5, seed=0)
    assert {e.line for e in a1} == {e.line for e in a2}
    assert not {e.line for e in a1} & {e.line for e in b1}
    assert len(a1) + len(b1) == len(ex) and 0.3 < len(a1) / len(ex) < 0.7


def test_bad_rows_reported_with_file_and_line(tmp_path):
    f = tmp_path / "dev.tsv"
    f.write_text(
        "sentence1\tsentence2\tlabel\tidx\n"
        "A man sleeps.\tA person rests.\t0\t0\n"
        "only one column\n"
        "A dog.\tA cat.\tmaybe\t2\n"
        "\tEmpty first.\t1\t3\n"
        "Fine.\tAlso fine.\tnot_entailment\t4\n"
        "Range.\tBad.\t7\t5\n"
    )
    data = read_glue_file(str(f), "rte")
    assert [e.label for e in data.examples] == [0, 1]
    got = {(b.line, b.reason) for b in data.bad}
    assert got == {(3, "bad_columns"), (4, "bad_label"), (5, "empty_text"), (7, "bad_label")}
    msg = next(b for b in data.bad if b.line == 4).message()
    assert f"{f}:4" in msg and "maybe" in msg and "fix:" in msg


def test_stsb_bad_score_and_missing_column(tmp_path):
    f = tmp_path / "dev.tsv"
    f.write_text("sentence1\tsentence2\tscore\nA.\tB.\t3.5\nC.\tD.\thigh\n")
    data = read_glue_file(str(f), "stsb")
    assert [e.label for e in data.examples] == [3.5]
    assert [(b.line, b.reason) for b in data.bad] == [(3, "bad_label")]
    g = tmp_path / "x.tsv"
    g.write_text("sentence\tlabel\nfoo\t1\n")
    data = read_glue_file(str(g), "mrpc")  # a pair task on a single-sentence file
    assert data.examples == [] and data.bad[0].reason == "missing_column"


def test_unknown_layout_and_missing_file(tmp_path):
    f = tmp_path / "weird.txt"
    f.write_text("hello world\n")
    assert read_glue_file(str(f), "sst2").bad[0].reason == "unknown_layout"
    assert read_glue_file(str(tmp_path / "nope.tsv"), "sst2").bad[0].reason == "unreadable_file"


def test_registry_references():
    assert {k: t.reference for k, t in TASKS.items()} == {
        "cola": 51.3, "sst2": 91.3, "mrpc": 87.5, "stsb": 85.8, "qqp": 88.5, "mnli": 82.2, "qnli": 89.2,
        "rte": 59.9}
    assert TASKS["stsb"].is_regression and TASKS["cola"].metrics == ("matthews",)
    assert get_task("SST-2") is TASKS["sst2"]


@pytest.mark.parametrize("task, text, labels", [
    ("mnli", "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
             "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n"
             "0\t1\t1n\tgov\tx\tx\tx\tx\tA man eats.\tA person eats.\tentailment\tentailment\n"
             "1\t2\t2n\tgov\tx\tx\tx\tx\tA man eats.\tNobody eats.\tcontradiction\tcontradiction\n",
     [0, 2]),
    ("qnli", "index\tquestion\tsentence\tlabel\n0\tWho?\tHe did.\tentailment\n1\tWhen?\tBlue.\tnot_entailment\n",
     [0, 1]),
    ("qqp", "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n0\t1\t2\tHow?\tIn what way?\t1\n"
            "1\t3\t4\tWhy?\tWhere?\t0\n", [1, 0]),
    ("rte", "index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\tnot_entailment\n1\tC.\tD.\tentailment\n", [1, 0]),
])
def test_glue_layouts_with_string_labels(tmp_path, task, text, labels):
    f = tmp_path / "dev.tsv"
    f.write_text(text)
    data = read_glue_file(str(f), task)
    assert data.bad == [] and [e.label for e in data.examples] == labels
    assert all(e.text_b for e in data.examples)
