"""Prove a refactor kept outputs: run the same commands with an earlier commit and with this checkout.

    python scripts/compare_with_commit.py --ref 9e18364            # the commit before the redesign
    python scripts/compare_with_commit.py --ref HEAD~3 --only prepare

The earlier commit is exported with ``git archive`` and installed (no dependencies, no network) into its
own folder; both versions then run the *same command lines* in the same virtual environment:

* ``prepare`` on two shared books, seq 128, with ``--workers 1`` and ``--workers 2``, and once with
  whole-word masking, ``--no-nsp`` and a dupe factor of 2;
* ``pretrain`` (tiny teacher, 30 steps) and ``distill`` (15 steps) on that data;
* ``fill-mask``, ``qa`` and ``embed`` with the trained models.

Compared: every data Parquet file byte for byte, every training loss in ``metrics.jsonl`` bit for bit
(timings excluded), the saved weights, and the inference outputs. Prints one line per comparison and
exits 1 on any difference. A command whose flags the earlier commit does not know is reported, not
compared.
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DISTILFLOW_SHARED", REPO.parent / "shared" / "data"))
BOOKS = [SHARED / "corpus" / "gutenberg" / "pg1342.txt", SHARED / "corpus" / "gutenberg" / "pg11.txt"]
TOKENIZER = SHARED / "tokenizers" / "bert-base-uncased"
# metric fields that measure time, not numbers
TIMING = {"tokens_per_s", "seconds", "step_seconds", "mfu", "elapsed", "time", "samples_per_s", "wall_s"}


def install_ref(ref: str, dest: Path) -> Path:
    """``git archive REF`` -> DEST/src, installed with pip into DEST/site (``--no-deps``)."""
    src, site = dest / "src", dest / "site"
    src.mkdir(parents=True)
    archive = dest / "ref.tar"
    subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", "-o", str(archive), ref], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(src, filter="data")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(src)], check=True)
    return site


def commands(out: Path) -> list[tuple[str, list[str]]]:
    books = [str(b) for b in BOOKS]
    prep = ["prepare", "--input", *books, "--tokenizer", str(TOKENIZER), "--max-seq-len", "128"]
    data = str(out / "prep-w1")
    sq = out / "qa.jsonl"
    return [
        ("prepare", [*prep, "--output", data, "--workers", "1"]),
        ("prepare", [*prep, "--output", str(out / "prep-w2"), "--workers", "2"]),
        ("prepare", [*prep, "--output", str(out / "prep-variant"), "--whole-word-mask", "--no-nsp",
                     "--dupe-factor", "2", "--seed", "7", "--short-seq-prob", "0.2"]),
        ("train", ["pretrain", "--data", data, "--output", str(out / "teacher"), "--config", "tiny",
                   "--max-steps", "30", "--batch-size", "8", "--lr", "1e-3", "--log-every", "5", "--seed", "3"]),
        ("train", ["distill", "--data", data, "--teacher", str(out / "teacher"), "--output", str(out / "student"),
                   "--max-steps", "15", "--batch-size", "8", "--log-every", "5", "--seed", "3"]),
        ("train", ["distill", "--data", data, "--teacher", str(out / "teacher"),
                   "--output", str(out / "student-masked-ce"), "--max-steps", "10", "--batch-size", "8",
                   "--log-every", "2", "--restrict-ce-to-mask", "--mask-source", "static"]),
        ("infer", ["fill-mask", "--input", str(out / "fm.jsonl"), "--output", str(out / "fm"),
                   "--model", str(out / "student"), "--top-k", "3", "--device", "cpu"]),
        # QA needs a QA head: the student's encoder + a head initialised from a fixed seed (plain transformers)
        ("infer", ["python", "import torch, transformers as t; torch.manual_seed(0); "
                   f"m = t.AutoModelForQuestionAnswering.from_pretrained({str(out / 'student')!r}); "
                   f"m.save_pretrained({str(out / 'qa-model')!r}); "
                   f"t.AutoTokenizer.from_pretrained({str(out / 'student')!r}).save_pretrained({str(out / 'qa-model')!r})",
                   "--output", str(out / "qa-model")]),
        ("infer", ["qa", "--input", str(sq), "--output", str(out / "qa"), "--model", str(out / "qa-model"),
                   "--device", "cpu"]),
        ("infer", ["embed", "--input", str(out / "fm.jsonl"), "--output", str(out / "emb"),
                   "--model", str(out / "student"), "--device", "cpu", "--normalize"]),
    ]


def write_inputs(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = ["Elizabeth walked to the [MASK] with her sister.", "It is a truth universally [MASK].",
            "Mr. Darcy was [MASK] and proud.", "The [MASK] [MASK] was dark and cold."]
    (out / "fm.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    qa = [{"question": "What's my name?", "context": "My name is John and I live in Seattle"},
          {"question": "Where do I live?", "context": "My name is John and I live in Seattle"}]
    (out / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa))


def run_all(site: Path | None, out: Path, only: set[str], log: Path, models: Path | None = None,
            data: Path | None = None) -> dict[str, int]:
    """``models``: run the infer commands with the models trained under that folder (the reference run's), so
    inference is compared on the same weights even when training changed. ``data``: the prepared folder the
    train commands read instead of this run's own (the reference run's, migrated), so training is compared on
    the same data even when prepare's output changed on purpose."""
    write_inputs(out)
    env = {**os.environ, "DISTILFLOW_PROGRESS": "0", "PYTHONHASHSEED": "0"}
    if site is not None:
        env["PYTHONPATH"] = str(site)
    codes = {}
    with open(log, "a") as logf:
        for group, argv in commands(out):
            if group not in only:
                continue
            if models is not None and group == "infer":
                if argv[0] == "python":  # the QA model is the reference run's too
                    continue
                argv = [str(models / Path(a).relative_to(out)) if i and argv[i - 1] == "--model" else a
                        for i, a in enumerate(argv)]
            if data is not None and group == "train":
                argv = [str(data) if i and argv[i - 1] == "--data" else a for i, a in enumerate(argv)]
            if argv[0] == "python":
                cmd = [sys.executable, "-c", argv[1]]
            else:
                cmd = [sys.executable, "-c", "import sys; from distilflow.cli import main; sys.exit(main())", *argv]
            logf.write("$ distilflow " + " ".join(argv) + "\n")
            logf.flush()
            rc = subprocess.run(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, cwd=out).returncode
            target = Path(argv[argv.index("--output") + 1]).name
            codes[f"{argv[0]} -> {target}"] = rc
            print(f"  [{'ok' if rc == 0 else f'exit {rc}'}] distilflow {argv[0]} -> {target}", flush=True)
    return codes


# Files whose place changed between versions (the prepared layout of issue 13: token counts in their own
# folder, per-part counts in the hidden bookkeeping folder): compared under their new name.
MOVED = (("/pairs/token_counts.parquet", "/token_counts/token_counts.parquet"), ("/_counts/", "/.distilflow/counts/"))


def canonical(rel: str) -> str:
    for old, new in MOVED:
        rel = rel.replace(old, new)
    return rel


def data_files(root: Path) -> dict[str, Path]:
    """Parquet data and weights under ``root``, keyed by relative path (bookkeeping may move between
    versions, data may not)."""
    out = {}
    for p in root.rglob("*"):
        if not p.is_file() or "checkpoints" in p.parts:
            continue
        if (p.suffix in (".parquet", ".safetensors") or p.name == "metrics.jsonl") and "qa-model" not in p.parts:
            rel = canonical("/" + p.relative_to(root).as_posix())[1:]
            out[rel.replace("/.", "/")] = p
    return out


def migrated_copy(prepared: Path, dest: Path) -> Path:
    """A copy of a prepared folder of the old layout, migrated to this checkout's (renames only)."""
    from distilflow.tasks.core.stage import migrate_legacy

    shutil.copytree(prepared, dest)
    for stage in ("corpus", "pairs", "masked"):
        migrate_legacy(str(dest / stage))
    return dest


def losses(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        rows.append({k: v for k, v in rec.items() if k not in TIMING})
    return rows


def compare(ref_out: Path, new_out: Path, under: tuple[str, ...] = ()) -> int:
    ref, new = data_files(ref_out), data_files(new_out)
    if under:  # only the outputs of these folders
        ref = {k: v for k, v in ref.items() if k.startswith(under)}
        new = {k: v for k, v in new.items() if k.startswith(under)}
    bad = 0
    for rel in sorted(set(ref) | set(new)):
        if rel not in new or rel not in ref:
            print(f"  MISSING in {'new' if rel not in new else 'ref'}: {rel}")
            bad += 1
            continue
        if rel.endswith("metrics.jsonl"):
            same = losses(ref[rel]) == losses(new[rel])
        else:
            same = filecmp.cmp(ref[rel], new[rel], shallow=False)
        print(f"  {'same' if same else 'DIFFERENT'}: {rel}" + ("" if same else f" ({_sha(ref[rel])} vs {_sha(new[rel])})"))
        bad += not same
    return bad


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()[:12]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", default="9e18364", help="earlier commit to compare with (default: 9e18364, the "
                    "last commit before the option/layout redesign)")
    ap.add_argument("--work", default=None, help="work folder (default: a new temporary folder, removed)")
    ap.add_argument("--only", default="prepare,train,infer", help="groups to run: prepare,train,infer")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--infer-on-ref-models", action="store_true",
                    help="run this checkout's fill-mask/qa/embed with the models the reference commit trained, and "
                    "compare only their outputs: inference alone, even while training changes its numbers")
    ap.add_argument("--train-on-ref-data", action="store_true",
                    help="run this checkout's pretrain/distill (and fill-mask/qa/embed) on the data the reference "
                    "commit prepared (migrated to the new folder layout) and compare only their outputs: training "
                    "alone, even while prepare's output changes on purpose (sentence splitter v2, issue 13)")
    args = ap.parse_args()
    only = set(args.only.split(","))
    if "infer" in only or "train" in only:
        only |= {"prepare"}  # they read its output
    if "infer" in only:
        only |= {"train"}
    work = Path(args.work or tempfile.mkdtemp(prefix="distilflow-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    print(f"work folder {work}; command output in {log}")
    print(f"installing {args.ref} ...", flush=True)
    site = install_ref(args.ref, work / "ref")
    print(f"running with {args.ref}:", flush=True)
    ref_codes = run_all(site, work / "out-ref", only, log)
    print("running with this checkout:", flush=True)
    models = work / "out-ref" if args.infer_on_ref_models else None
    data = migrated_copy(work / "out-ref" / "prep-w1", work / "ref-data") if args.train_on_ref_data else None
    new_only = {"infer"} if models else (only - {"prepare"}) if data else only
    new_codes = run_all(None, work / "out-new", new_only, log, models, data)
    bad = sum(1 for k in ref_codes if ref_codes[k] != new_codes.get(k, ref_codes[k] if models or data else None))
    if bad:
        print(f"{bad} command(s) exited differently: ref {ref_codes} new {new_codes}")
    print("comparing:")
    under = ("fm/", "emb/", "qa/") if models else ("teacher/", "student", "fm/", "emb/", "qa/") if data else ()
    bad += compare(work / "out-ref", work / "out-new", under)
    print("IDENTICAL" if not bad else f"{bad} DIFFERENCE(S)")
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
