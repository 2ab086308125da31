"""The main job: ``distilflow pipeline`` -- corpus -> tokenizer -> teacher -> student -> evaluation -> batch use.

One parent flow; each stage is a sub-flow run through :func:`~distilflow.tasks.pipeline.stages.run_stage`,
which records ``OUT/_pipeline/<stage>.json`` so a rerun skips finished stages. Stages:

1. ``vocab``     train a WordPiece vocabulary on the training inputs (when no ``--tokenizer``)
2. ``prepare``   shard -> pairs -> masks for the training inputs, and for the held-out inputs
3. ``pretrain``  a BERT teacher, MLM + NSP (when no ``--teacher``)
4. ``distill``   the DistilBERT student from the teacher
5. ``evaluate``  held-out MLM (student beside teacher), bias probe, and GLUE/SQuAD when files are given
6. ``fill-mask`` batch fill-mask over held-out sentences with one word masked; top-1/top-5 vs the word
7. a markdown report artifact: what ran, sizes, throughput, result tables, where the outputs are

What each stage gets is worked out in ``tasks/pipeline/`` (plan, stages, report); this module only wires.
"""

from __future__ import annotations

import os
import time
from typing import Any

from prefect import flow, get_run_logger

from distilflow.flows.common import config_flow, publish
from distilflow.tasks.core.io import is_local, join, write_bytes, write_json
from distilflow.tasks.core.remote import staged_output
from distilflow.tasks.pipeline import plan
from distilflow.tasks.pipeline.config import PRESETS, PipelineConfig
from distilflow.tasks.pipeline.fill_mask import fill_mask_accuracy, mask_queries
from distilflow.tasks.pipeline.replicate import write_replication
from distilflow.tasks.pipeline.report import pipeline_report
from distilflow.tasks.pipeline.stages import run_stage


@flow(name="vocab", log_prints=True)
def vocab_flow(inputs: list[str], output: str, vocab_size: int = 30000, cased: bool = False) -> dict[str, Any]:
    """Train a BERT WordPiece vocabulary on the inputs; saved with ``save_pretrained`` in ``output`` (a bucket
    URL: saved locally, then uploaded file by file with its manifest)."""
    from distilflow.tasks.prepare.vocab import VocabConfig, corpus_texts, train_wordpiece

    cfg = VocabConfig(vocab_size=vocab_size, lowercase=not cased)
    with staged_output(output) as stage:
        tok = train_wordpiece(corpus_texts(inputs), str(stage.local), cfg)
    return {"tokenizer": output, "vocab_size": len(tok), "lowercase": cfg.lowercase}


@config_flow(PipelineConfig, name="pipeline", log_prints=True)
def pipeline_flow(cfg: PipelineConfig) -> dict[str, Any]:
    """Corpus -> tokenizer -> teacher -> student -> evaluation -> batch fill-mask -> report."""
    from distilflow.flows.evaluate import evaluate_flow
    from distilflow.flows.inference import fill_mask_flow
    from distilflow.flows.prepare import prepare_flow
    from distilflow.flows.train import distill_flow, pretrain_flow

    out, seed, log = cfg.output, cfg.seed, get_run_logger().info
    t_start = time.perf_counter()
    if is_local(out):  # (a bucket URL needs no folder; makedirs there could create a missing bucket)
        os.makedirs(out, exist_ok=True)
    write_json(join(out, "pipeline-config.json"), {**cfg.to_dict(), "preset_values": PRESETS[cfg.preset]})
    if cfg.glue_tasks and not cfg.glue_dir:
        log("--glue-tasks without --glue-dir: no GLUE fine-tuning")
    stages: dict[str, dict[str, Any]] = {}
    corpus = plan.split_corpus(cfg)
    log(f"corpus: {corpus.name}")

    tok = cfg.tokenizer or join(out, "tokenizer")
    if not cfg.tokenizer:
        vs = cfg.p("vocab_size")
        stages["vocab"] = run_stage(out, "vocab", {"inputs": corpus.train, "vocab_size": vs, "cased": cfg.cased},
                                    vocab_flow, corpus.train, tok, vocab_size=vs, cased=cfg.cased,
                                    outputs=(tok,), log=log)
    vocab = (stages["vocab"],) if "vocab" in stages else ()

    msl = cfg.p("max_seq_len")
    data, held = join(out, "data"), join(out, "heldout")
    prep = {"tokenizer": tok, "max_seq_len": msl, "seed": seed}  # not workers: same bytes for any count
    for name, files, folder, s in (("prepare", corpus.train, data, seed), ("prepare-heldout", corpus.heldout, held,
                                                                            seed + 1)):
        stages[name] = run_stage(out, name, {**prep, "inputs": files}, prepare_flow, inputs=files, output=folder,
                                 tokenizer=tok, max_seq_len=msl, seed=s, workers=cfg.workers, after=vocab,
                                 outputs=(folder,), log=log)
    prepared = (stages["prepare"], stages["prepare-heldout"])

    teacher = cfg.teacher or join(out, "teacher")
    if not cfg.teacher:
        spec, ts = plan.teacher_model_spec(cfg, tok), plan.train_settings(cfg, held, "pretrain")
        stages["pretrain"] = run_stage(out, "pretrain", {"data": data, "config": cfg.p("teacher_config"), **ts},
                                       pretrain_flow, data=data, output=teacher, model=spec, **ts,
                                       after=prepared, outputs=(teacher,), log=log)
    teacher_stage = (stages["pretrain"],) if "pretrain" in stages else ()

    student, ss = join(out, "student"), plan.train_settings(cfg, held, "distill")
    stages["distill"] = run_stage(out, "distill", {"data": data, "teacher": teacher, **ss}, distill_flow, data=data,
                                  teacher=teacher, output=student, **ss, after=prepared + teacher_stage,
                                  outputs=(student,), log=log)

    tasks, eval_out = plan.eval_tasks(cfg), join(out, "eval")
    ev = {"teacher": teacher, "data": held, "glue_dir": cfg.glue_dir, "squad_dev": cfg.squad_dev, "seed": seed,
          **plan.eval_settings(cfg)}
    stages["evaluate"] = run_stage(out, "evaluate", {"model": student, "tasks": tasks, **ev}, evaluate_flow,
                                   model=student, tasks=tasks, output=eval_out, **ev,
                                   after=(stages["distill"], *prepared), outputs=(eval_out,), log=log)

    queries, fm_out = join(out, "fill-mask", "queries.jsonl"), join(out, "fill-mask", "predictions")

    def fill_mask_stage() -> dict[str, Any]:
        n = mask_queries(join(held, "corpus"), queries, tok, cfg.p("fill_mask_rows"), seed)
        t0 = time.perf_counter()
        fill_mask_flow(input=queries, output=fm_out, model=student, top_k=5, overwrite=True)
        return {**fill_mask_accuracy(queries, fm_out), "queries": n,
                "rows_per_s": round(n / (time.perf_counter() - t0), 1)}

    stages["fill-mask"] = run_stage(out, "fill-mask", {"model": student, "heldout": corpus.heldout, "seed": seed,
                                                       "rows": cfg.p("fill_mask_rows")}, fill_mask_stage,
                                    after=(stages["distill"], stages["prepare-heldout"]),
                                    outputs=(join(out, "fill-mask"),), log=log)

    if cfg.p("replication") and cfg.glue_dir:  # the replication recipe's report of record
        stages["replication"] = run_stage(
            out, "replication", {"teacher": teacher, "student": student, "speed_batch": cfg.p("speed_batch")},
            write_replication, out, eval_out, teacher, student, cfg.glue_dir, preset=cfg.preset,
            speed_batch=cfg.p("speed_batch"), speed_rows=cfg.p("speed_rows", 872), command=plan.command_line(cfg),
            stage_seconds={k: r["seconds"] for k, r in stages.items()}, estimate=cfg.p("estimate_seconds"),
            precision=cfg.precision, after=(stages["evaluate"],), log=log)

    total = time.perf_counter() - t_start
    report = pipeline_report(cfg.preset, corpus.name, stages, out, total)
    publish(report, key="distilflow-pipeline-report", description=f"pipeline report for {out}")
    write_bytes(join(out, "report.md"), report.encode("utf-8"))
    return {"output": out, "seconds": round(total, 1), "stages": stages, "report": join(out, "report.md")}


def run_pipeline(cfg: PipelineConfig) -> int:
    """``distilflow pipeline``: checks that fail fast, the flow, where the report is."""
    plan.preflight(cfg)
    r = pipeline_flow(**cfg.to_dict())
    print(f"pipeline finished in {r['seconds']:.0f} s; report: {r['report']}")
    print("In the Prefect UI (with `prefect server start` and PREFECT_API_URL set): Runs -> flow 'pipeline' -> "
          "Artifacts -> 'distilflow-pipeline-report'")
    return 0
