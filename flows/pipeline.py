"""The main job: ``distilflow pipeline`` -- corpus -> tokenizer -> teacher -> student -> evaluation -> batch use.

    distilflow pipeline --output runs/demo                                   # embedded demo corpus, ~minutes
    distilflow pipeline --input ../shared/data/corpus/gutenberg/pg*.txt --output runs/gutenberg --preset small

One parent flow; each stage is a sub-flow whose result is recorded in ``OUT/_pipeline/<stage>.json``
with the fingerprint of its config, so a rerun skips finished stages (and a stage whose config changed
runs again). Stages:

1. ``vocab``     train a WordPiece vocabulary on the training inputs (when no ``--tokenizer``)
2. ``prepare``   shard -> pairs -> masks for the training inputs, and for the held-out inputs
3. ``pretrain``  a BERT teacher, MLM + NSP (when no ``--teacher``)
4. ``distill``   the DistilBERT student from the teacher
5. ``evaluate``  held-out MLM (student beside teacher), bias probe, and GLUE/SQuAD when files are given
6. ``fill-mask`` batch fill-mask over held-out sentences with one word masked; top-1/top-5 vs the word
7. a markdown report artifact: what ran, sizes, throughput, result tables, where the outputs are
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any

from prefect import flow, get_run_logger

from distilflow.flows.common import markdown_table, publish
from distilflow.tasks.core.config import Config, ConfigError, require
from distilflow.tasks.core.io import InputError, exists, expand_inputs, join, read_json, write_json

PRESETS: dict[str, dict[str, Any]] = {
    # debug: the README's first command -- under a minute on 2 idle CPU cores, tiny models, demo corpus
    "debug": {"max_seq_len": 64, "vocab_size": 2000, "teacher_config": "debug", "pretrain_steps": 300,
              "distill_steps": 200, "batch_size": 16, "pretrain_lr": 1e-3, "distill_lr": 1e-3,
              "eval_sequences": 2000, "fill_mask_rows": 200},
    # small: real text on one GPU, or ~2 h on 2 CPU cores (pretrain 25-48 min, distill ~70 min measured)
    "small": {"max_seq_len": 128, "vocab_size": 30000, "teacher_config": "mini", "pretrain_steps": 3000,
              "distill_steps": 2000, "batch_size": 32, "pretrain_lr": 5e-4, "distill_lr": 5e-4,
              "eval_sequences": 5000, "fill_mask_rows": 1000},
    # base: BERT-base teacher at seq 512 -- meant for a GPU pool
    "base": {"max_seq_len": 512, "vocab_size": 30000, "teacher_config": "base", "pretrain_steps": 100000,
             "distill_steps": 100000, "batch_size": 32, "pretrain_lr": 1e-4, "distill_lr": 5e-4,
             "eval_sequences": 20000, "fill_mask_rows": 5000},
}


# The debug teacher: 2 layers x 128 (smaller than the `tiny`..`base` presets of the training job would allow
# for a few-minute CPU demo while still learning the demo corpus).
DEBUG_TEACHER = {"model_type": "bert", "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "intermediate_size": 512, "max_position_embeddings": 128}


@dataclass(frozen=True)
class PipelineConfig(Config):
    output: str
    inputs: tuple[str, ...] = ()  # empty: the embedded demo corpus
    heldout: tuple[str, ...] = ()  # empty: the last input file (or the demo's held-out file)
    tokenizer: str = ""  # empty: train a WordPiece vocabulary
    vocab_size: int = 0  # 0: the preset's
    cased: bool = False
    teacher: str = ""  # empty: pretrain one
    teacher_config: str = ""  # empty: the preset's
    preset: str = "debug"
    glue_dir: str = ""
    glue_tasks: tuple[str, ...] = ()
    squad_dev: str = ""
    workers: int = 1
    seed: int = 0

    def check(self) -> None:
        n = type(self).__name__
        require(bool(self.output), n, "output", "is required")
        require(self.preset in PRESETS, n, "preset", f"must be one of {sorted(PRESETS)}, got {self.preset!r}")
        require(self.workers >= 1, n, "workers", "must be >= 1")
        require(not (self.heldout and not self.inputs), n, "heldout", "needs --input as well")

    def p(self, key: str) -> Any:
        """A preset value, unless overridden by a non-empty field of the same name."""
        own = getattr(self, key, None)
        return own if own else PRESETS[self.preset][key]


# -- stage bookkeeping -----------------------------------------------------------------------------------
def _fingerprint(cfg: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_stage(output: str, name: str, cfg: dict[str, Any], fn, *args: Any, after: tuple[dict[str, Any], ...] = (),
              outputs: tuple[str, ...] = (), **kwargs: Any) -> dict[str, Any]:
    """Run ``fn`` unless ``OUT/_pipeline/<name>.json`` records a finished run with the same config.

    ``after``: the results of the stages this one reads; their fingerprints are part of this stage's, so a
    stage that ran again (new data, new teacher) makes everything downstream run again too.
    ``outputs``: this stage's folders, deleted before it runs again with a changed config (they hold the
    old config's results, which the stage's own resume logic would refuse to mix with new ones). A stage
    killed half way has no marker and its folders are kept: the sub-flow resumes from them.
    """
    logger = get_run_logger()
    marker = join(output, "_pipeline", f"{name}.json")
    fp = _fingerprint({**cfg, "after": [a["fingerprint"] for a in after]})
    if exists(marker):
        rec = read_json(marker)
        if rec.get("fingerprint") == fp:
            logger.info("stage %s: already done with the same config, skipped", name)
            return {**rec["result"], "skipped": True, "seconds": rec.get("seconds", 0.0), "fingerprint": fp}
        logger.info("stage %s: config or input changed, running again (removing %s)", name, ", ".join(outputs))
        for folder in outputs:
            shutil.rmtree(folder, ignore_errors=True)
        os.remove(marker)
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    seconds = time.perf_counter() - t0
    write_json(marker, {"stage": name, "fingerprint": fp, "config": cfg, "seconds": round(seconds, 2),
                        "result": _jsonable(result)})
    return {**_jsonable(result), "skipped": False, "seconds": round(seconds, 2), "fingerprint": fp}


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


# -- stages (sub-flows) -------------------------------------------------------------------------------------
@flow(name="vocab", log_prints=True)
def vocab_flow(inputs: list[str], output: str, vocab_size: int = 30000, cased: bool = False) -> dict[str, Any]:
    """Train a BERT WordPiece vocabulary on the inputs; saved with ``save_pretrained`` in ``output``."""
    from distilflow.tasks.prepare.vocab import VocabConfig, corpus_texts, train_wordpiece

    cfg = VocabConfig(vocab_size=vocab_size, lowercase=not cased)
    tok = train_wordpiece(corpus_texts(inputs), output, cfg)
    return {"tokenizer": output, "vocab_size": len(tok), "lowercase": cfg.lowercase}


def _mask_queries(heldout_corpus: str, out_file: str, tokenizer: str, rows: int, seed: int) -> int:
    """Held-out sentences with one whole word replaced by [MASK] (the answer kept in ``answer``)."""
    import numpy as np
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    vocab = tok.get_vocab()
    rng = np.random.default_rng(seed)
    sentences: list[str] = []
    for f in sorted(os.listdir(heldout_corpus)):
        if f.endswith(".parquet"):
            for sents in pq.read_table(os.path.join(heldout_corpus, f), columns=["sentences"]).column(0).to_pylist():
                sentences.extend(sents)
    queries = []
    for i in rng.permutation(len(sentences)):
        words = sentences[int(i)].split(" ")
        # candidate answers: alphabetic words that are a single token of the vocabulary
        cands = [j for j, w in enumerate(words) if w.isalpha() and (w.lower() if tok.do_lower_case else w) in vocab]
        if len(words) < 4 or not cands:
            continue
        j = cands[int(rng.integers(0, len(cands)))]
        answer = words[j]
        words[j] = tok.mask_token
        queries.append({"text": " ".join(words), "answer": answer.lower() if tok.do_lower_case else answer})
        if len(queries) >= rows:
            break
    os.makedirs(os.path.dirname(out_file), exist_ok=True)
    with open(out_file, "w", encoding="utf-8") as out:
        out.writelines(json.dumps(q) + "\n" for q in queries)
    return len(queries)


def _fill_mask_accuracy(queries_file: str, predictions_dir: str) -> dict[str, Any]:
    import pyarrow.parquet as pq

    with open(queries_file, encoding="utf-8") as fh:
        answers = [json.loads(line)["answer"] for line in fh]
    preds: dict[int, list[tuple[int, str]]] = {}
    for f in sorted(os.listdir(predictions_dir)):
        if f.endswith(".parquet") and not f.startswith("_"):
            t = pq.read_table(os.path.join(predictions_dir, f), columns=["row_id", "rank", "token_str"])
            for row, rank, tok in zip(*(t.column(c).to_pylist() for c in ("row_id", "rank", "token_str")), strict=True):
                preds.setdefault(row, []).append((rank, tok.strip()))
    top1 = top5 = 0
    for i, ans in enumerate(answers):
        ranked = [t for _, t in sorted(preds.get(i, []))]
        top1 += bool(ranked) and ranked[0] == ans
        top5 += ans in ranked[:5]
    n = max(len(answers), 1)
    return {"rows": len(answers), "top1": round(top1 / n, 4), "top5": round(top5 / n, 4)}


@flow(name="pipeline", log_prints=True)
def pipeline_flow(output: str, inputs: list[str] | None = None, heldout: list[str] | None = None,
                  tokenizer: str | None = None, vocab_size: int = 0, cased: bool = False, teacher: str | None = None,
                  teacher_config: str = "", preset: str = "debug", glue_dir: str | None = None,
                  glue_tasks: list[str] | None = None, squad_dev: str | None = None, workers: int = 1,
                  seed: int = 0) -> dict[str, Any]:
    """Corpus -> tokenizer -> teacher -> student -> evaluation -> batch fill-mask -> report."""
    from distilflow.flows.evaluate import evaluate_flow
    from distilflow.flows.inference import fill_mask_flow
    from distilflow.flows.prepare import prepare_flow
    from distilflow.flows.train import distill_flow, pretrain_flow

    cfg = PipelineConfig(output=output, inputs=tuple(inputs or ()), heldout=tuple(heldout or ()),
                         tokenizer=tokenizer or "", vocab_size=vocab_size, cased=cased, teacher=teacher or "",
                         teacher_config=teacher_config, preset=preset, glue_dir=glue_dir or "",
                         glue_tasks=tuple(glue_tasks or ()), squad_dev=squad_dev or "", workers=workers, seed=seed)
    logger = get_run_logger()
    t_start = time.perf_counter()
    os.makedirs(output, exist_ok=True)
    write_json(join(output, "pipeline-config.json"), {**cfg.to_dict(), "preset_values": PRESETS[preset]})
    stages: dict[str, dict[str, Any]] = {}

    # 0. corpus: the user's files, or the embedded demo corpus
    if cfg.inputs:
        train_files = expand_inputs(list(cfg.inputs))
        if cfg.heldout:
            held_files = expand_inputs(list(cfg.heldout))
            train_files = [f for f in train_files if f not in set(held_files)]
        elif len(train_files) >= 2:
            train_files, held_files = train_files[:-1], train_files[-1:]
        else:
            raise InputError(f"{cfg.inputs[0]}: one input file; give --heldout FILE for evaluation data")
        corpus_name = f"{len(train_files)} input file(s); held out: {', '.join(os.path.basename(h) for h in held_files)}"
    else:
        from distilflow.tasks.prepare.demo_corpus import write_demo_corpus

        train_files, held_files = write_demo_corpus(join(output, "demo-corpus"), seed=seed)
        corpus_name = "embedded demo corpus (generated country facts, tasks/demo_corpus.py)"
    logger.info("corpus: %s", corpus_name)

    # 1. tokenizer
    tok_path = cfg.tokenizer
    if not tok_path:
        tok_path = join(output, "tokenizer")
        stages["vocab"] = run_stage(output, "vocab", {"inputs": train_files, "vocab_size": cfg.p("vocab_size"),
                                                      "cased": cfg.cased},
                                    vocab_flow, train_files, tok_path, vocab_size=cfg.p("vocab_size"), cased=cfg.cased,
                                    outputs=(tok_path,))
    vocab = (stages["vocab"],) if "vocab" in stages else ()

    # 2. prepare training and held-out data (same tokenizer, same masking)
    msl = cfg.p("max_seq_len")
    data, held = join(output, "data"), join(output, "heldout")
    prep = {"tokenizer": tok_path, "max_seq_len": msl, "seed": seed}  # not workers: same bytes for any count
    stages["prepare"] = run_stage(output, "prepare", {**prep, "inputs": train_files}, prepare_flow, train_files, data,
                                  tok_path, max_seq_len=msl, seed=seed, workers=workers, after=vocab, outputs=(data,))
    stages["prepare-heldout"] = run_stage(output, "prepare-heldout", {**prep, "inputs": held_files}, prepare_flow,
                                          held_files, held, tok_path, max_seq_len=msl, seed=seed + 1, workers=workers,
                                          after=vocab, outputs=(held,))
    prepared = (stages["prepare"], stages["prepare-heldout"])

    # 3. teacher
    bs = cfg.p("batch_size")
    # resume: a pipeline killed during training continues from the last checkpoint (every 10% of the steps)
    common = {"batch_size": bs, "seed": seed, "eval_data": held, "eval_sequences": cfg.p("eval_sequences"),
              "log_every": 20, "resume": True}
    teacher_path = cfg.teacher
    teacher_spec = cfg.p("teacher_config")
    if teacher_spec == "debug":
        from transformers import AutoTokenizer

        teacher_spec = join(output, "teacher-config.json")
        write_json(teacher_spec, {**DEBUG_TEACHER, "vocab_size": len(AutoTokenizer.from_pretrained(tok_path))})
    if not teacher_path:
        teacher_path = join(output, "teacher")
        t_settings = {**common, "max_steps": cfg.p("pretrain_steps"), "lr": cfg.p("pretrain_lr"),
                      "save_every": max(1, cfg.p("pretrain_steps") // 10)}
        stages["pretrain"] = run_stage(output, "pretrain", {"data": data, "config": cfg.p("teacher_config"),
                                                            **t_settings},
                                       pretrain_flow, data, teacher_path, config=teacher_spec, settings=t_settings,
                                       after=prepared, outputs=(teacher_path,))
    teacher_stage = (stages["pretrain"],) if "pretrain" in stages else ()

    # 4. student
    student = join(output, "student")
    s_settings = {**common, "max_steps": cfg.p("distill_steps"), "lr": cfg.p("distill_lr"),
                  "save_every": max(1, cfg.p("distill_steps") // 10)}
    stages["distill"] = run_stage(output, "distill", {"data": data, "teacher": teacher_path, **s_settings},
                                  distill_flow, data, teacher_path, student, settings=s_settings,
                                  after=prepared + teacher_stage, outputs=(student,))

    # 5. evaluation
    tasks = ["mlm", "bias"] + list(cfg.glue_tasks if cfg.glue_dir else ()) + (["squad"] if cfg.squad_dev else [])
    eval_out = join(output, "eval")
    ev_args = {"teacher": teacher_path, "data": held, "glue_dir": cfg.glue_dir or None,
               "squad_dev": cfg.squad_dev or None, "seed": seed}
    stages["evaluate"] = run_stage(output, "evaluate", {"model": student, "tasks": tasks, **ev_args},
                                   evaluate_flow, student, tasks, eval_out, **ev_args,
                                   after=(stages["distill"], *prepared), outputs=(eval_out,))

    # 6. batch fill-mask over held-out sentences
    queries = join(output, "fill-mask", "queries.jsonl")
    fm_out = join(output, "fill-mask", "predictions")

    def fill_mask_stage() -> dict[str, Any]:
        n = _mask_queries(join(held, "corpus"), queries, tok_path, cfg.p("fill_mask_rows"), seed)
        t0 = time.perf_counter()
        fill_mask_flow(queries, fm_out, student, top_k=5, overwrite=True)
        acc = _fill_mask_accuracy(queries, fm_out)
        return {**acc, "queries": n, "rows_per_s": round(n / (time.perf_counter() - t0), 1)}

    stages["fill-mask"] = run_stage(output, "fill-mask", {"model": student, "heldout": held_files, "seed": seed,
                                                          "rows": cfg.p("fill_mask_rows")}, fill_mask_stage,
                                    after=(stages["distill"], stages["prepare-heldout"]),
                                    outputs=(join(output, "fill-mask"),))

    # 7. report
    total = time.perf_counter() - t_start
    report = _report(cfg, corpus_name, stages, output, total)
    publish(report, key="distilflow-pipeline-report", description=f"pipeline report for {output}")
    with open(join(output, "report.md"), "w", encoding="utf-8") as f:
        f.write(report)
    return {"output": output, "seconds": round(total, 1), "stages": stages, "report": join(output, "report.md")}


def _report(cfg: PipelineConfig, corpus: str, stages: dict[str, dict[str, Any]], output: str, total: float) -> str:
    rows = []
    for name, r in stages.items():
        rows.append({"stage": name, "state": "skipped (done before)" if r.get("skipped") else "ran",
                     "seconds": r.get("seconds", 0.0), "summary": _summary(name, r)})
    md = [f"# distilflow pipeline: `{output}`", "",
          f"Preset **{cfg.preset}**; corpus: {corpus}; total {total:.1f} s.", "", "## Stages", "",
          markdown_table(rows, ["stage", "state", "seconds", "summary"])]
    ev_md = join(output, "eval", "results.md")
    if exists(ev_md):
        with open(ev_md, encoding="utf-8") as fh:
            md += ["", "## Evaluation", "", re.sub(r"^# ", "### ", fh.read(), flags=re.M)]
    fm = stages.get("fill-mask", {})
    if fm:
        md += ["", "## Batch fill-mask on held-out sentences", "",
               markdown_table([{"rows": fm.get("rows"), "top-1 accuracy": fm.get("top1"), "top-5 accuracy": fm.get("top5"),
                                "rows/s": fm.get("rows_per_s")}])]
    md += ["", "## Outputs", "",
           *(f"- `{join(output, p)}`" for p in ("data", "heldout", "teacher", "student", "eval/results.md",
                                                "fill-mask/predictions", "report.md"))]
    return "\n".join(md) + "\n"


def _summary(name: str, r: dict[str, Any]) -> str:
    if name == "vocab":
        return f"{r.get('vocab_size')} WordPiece tokens"
    if name.startswith("prepare"):
        return f"{r.get('corpus')} docs, {r.get('pairs')} sequences, {r.get('tokens', 0):,} tokens"
    if name in ("pretrain", "distill"):
        ev, te = r.get("eval") or {}, r.get("teacher_eval") or {}
        s = f"{r.get('steps')} steps, {r.get('parameters', 0):,} parameters"
        if ev:
            s += f"; held-out masked-token accuracy {ev.get('accuracy', 0):.3f}"
        if te:
            s += f" (teacher {te.get('accuracy', 0):.3f})"
        return s
    if name == "fill-mask":
        return f"{r.get('rows')} rows, top-1 {r.get('top1')}, top-5 {r.get('top5')}"
    if name == "evaluate":
        return "see below"
    return ""


# -- command line ---------------------------------------------------------------------------------------
def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pipeline", help="the whole job: corpus -> tokenizer -> teacher -> student -> eval -> fill-mask",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="output folder (local); every stage writes a sub-folder")
    p.add_argument("--input", nargs="*", default=[], metavar="URL",
                   help="corpus files/folders/globs (default: the embedded demo corpus)")
    p.add_argument("--heldout", nargs="*", default=[], metavar="URL",
                   help="held-out files for evaluation (default: the last input file in sorted order)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: train a WordPiece vocabulary)")
    p.add_argument("--vocab-size", type=int, default=0, help="vocabulary size to train (default: the preset's)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--cased", dest="cased", action="store_true", help="keep case and accents in the trained vocabulary")
    g.add_argument("--uncased", dest="cased", action="store_false",
                   help="lower-case and strip accents, as bert-base-uncased (default)")
    p.add_argument("--teacher", default=None, help="a BERT model folder (default: pretrain one)")
    p.add_argument("--teacher-config", default="", help="teacher size when pretraining: tiny|mini|base|PATH "
                   "(default: the preset's)")
    p.add_argument("--preset", default="debug", choices=sorted(PRESETS),
                   help="debug (default; minutes on a CPU), small (real text, CPU), base (GPU)")
    p.add_argument("--glue-dir", default=None, help="GLUE data folder (e.g. ../shared/data/glue) to fine-tune on")
    p.add_argument("--glue-tasks", default="", help="comma list, e.g. sst2,mrpc (needs --glue-dir)")
    p.add_argument("--squad-dev", default=None, help="SQuAD v1.1 dev json (split by article for train/dev)")
    p.add_argument("--workers", type=int, default=1, help="worker processes for the data stages (default 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=_run, cased=False)


def _run(a: argparse.Namespace) -> int:
    try:
        # fail fast, before a flow run starts: inputs exist, tokenizer/teacher folders exist
        if a.input:
            expand_inputs(a.input)
        if a.heldout:
            expand_inputs(a.heldout)
        for opt, path in (("--tokenizer", a.tokenizer), ("--teacher", a.teacher)):
            if path and not os.path.isdir(path):
                raise InputError(f"{opt} {path}: no such folder")
        r = pipeline_flow(a.output, inputs=a.input, heldout=a.heldout, tokenizer=a.tokenizer, vocab_size=a.vocab_size,
                          cased=a.cased, teacher=a.teacher, teacher_config=a.teacher_config, preset=a.preset,
                          glue_dir=a.glue_dir, glue_tasks=[t for t in a.glue_tasks.split(",") if t],
                          squad_dev=a.squad_dev, workers=a.workers, seed=a.seed)
    except (InputError, ConfigError, FileNotFoundError) as e:
        print(f"distilflow pipeline: error: {e}", file=sys.stderr)
        return 2
    print(f"pipeline finished in {r['seconds']:.0f} s; report: {r['report']}")
    print("In the Prefect UI (with `prefect server start` and PREFECT_API_URL set): Runs -> flow 'pipeline' -> "
          "Artifacts -> 'distilflow-pipeline-report'")
    return 0
