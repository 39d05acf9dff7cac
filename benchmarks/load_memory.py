"""Peak RSS while loading a full fp32 SD v1.5 checkpoint: sdlite vs diffusers, same file, same run.

    python benchmarks/load_memory.py [--workdir DIR] [--keep|--no-keep] [--json OUT]
                                     [--formats safetensors,ckpt]

1. Makes (once; cached in --workdir, default ./.cache/bench) a full SD v1.5-architecture
   checkpoint with seeded random weights in the CompVis single-file layout, fp32, as
   `.safetensors` and `.ckpt` (zip; `{"state_dict": ...}`), an fp16 export made by
   `sdlite.export_checkpoint`, and an offline diffusers config folder (configs + tokenizer only,
   no weights) for `StableDiffusionPipeline.from_single_file(config=...)`.
2. Measures every loader in a fresh child process (`--child NAME`) so that peaks do not mix:
   the child loads, then touches every weight (sums it, as inference would read it), and
   reports VmHWM (peak RSS) and VmRSS from /proc/self/status, in bytes, plus wall time.
3. Prints a JSON summary and a markdown table, and writes the JSON to --json.

The files are kept by default so re-runs skip the ~1 minute of file creation; `--no-keep`
deletes the checkpoints (not the small config folder) at the end. Target: sdlite's peak RSS
<= 1.25 x the file size.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = 1.25
GiB = 1024**3
SEED = 1234


# ---------------------------------------------------------------------------- /proc


def proc_status() -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0]) * 1024  # reported in kB
    return out


# ---------------------------------------------------------------------------- file creation (child)


def _random_state(seed: int) -> dict:
    """The full SD v1 architecture from sdlite's own modules, filled with seeded noise, CompVis keys."""
    import torch

    from sdlite.checkpoint import PREFIXES, build_model
    from sdlite.config import SD_V1

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for component, prefix in PREFIXES.items():
        with torch.device("meta"):
            model = build_model(component, SD_V1)
        model.to_empty(device="cpu")
        with torch.no_grad():
            for name, t in model.state_dict().items():
                t.normal_(0.0, 0.02, generator=g)  # small std: the values do not matter, only the bytes
                sd[prefix + name] = t
        del model
    # Released CompVis files also carry the int64 `...embeddings.position_ids` buffer (308 bytes).
    # It is left out: `Checkpoint.load("text")` currently passes it to load_state_dict and fails
    # (the key is on sdlite's ignore list for validation only). Irrelevant to memory.
    return sd


def make_files(workdir: Path, formats: list[str]) -> None:
    import torch

    import sdlite
    from sdlite.tensorfile import save_safetensors

    workdir.mkdir(parents=True, exist_ok=True)
    st, ck, fp16 = workdir / "sd15-fp32.safetensors", workdir / "sd15-fp32.ckpt", workdir / "sd15-fp16.safetensors"
    if not st.exists() or ("ckpt" in formats and not ck.exists()):
        t0 = time.perf_counter()
        sd = _random_state(SEED)
        print(f"[make] random weights: {len(sd)} tensors in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        if not st.exists():
            save_safetensors(sd, st, metadata={"format": "pt"})
            print(f"[make] wrote {st} ({st.stat().st_size / GiB:.2f} GiB)", file=sys.stderr)
        if "ckpt" in formats and not ck.exists():
            tmp = ck.with_name(ck.name + ".partial")
            torch.save({"state_dict": sd}, tmp)  # zip format (the default since torch 1.6)
            os.replace(tmp, ck)
            print(f"[make] wrote {ck} ({ck.stat().st_size / GiB:.2f} GiB)", file=sys.stderr)
        del sd
        gc.collect()
    if not fp16.exists():
        sdlite.export_checkpoint(st, fp16, dtype=torch.float16)
        print(f"[make] wrote {fp16} ({fp16.stat().st_size / GiB:.2f} GiB)", file=sys.stderr)


def prepare(workdir: Path) -> Path:
    """The random checkpoints (fp32, fp16) and the offline diffusers config folder; returns the folder."""
    make_files(workdir, ["safetensors"])
    config = workdir / "diffusers-sd15-config"
    if not (config / "model_index.json").exists():
        make_diffusers_config(config)
    return config


def make_diffusers_config(folder: Path) -> None:
    """A diffusers SD folder with configs and tokenizer only (no weights), for offline from_single_file.

    Reuses the test suite's mapping from sdlite configs to diffusers/transformers configs
    (tests/refmodels.py), with the weight randomisation skipped: the models stay on `meta`
    and only their configs are written.
    """
    sys.path.insert(0, str(ROOT / "tests"))
    import refmodels
    from diffusers import StableDiffusionPipeline

    from sdlite.config import SD_V1

    refmodels.randomize_ = lambda module, seed: module  # configs only: keep the models on meta
    vae, text = refmodels.diffusers_vae(SD_V1.vae), refmodels.transformers_clip(SD_V1.text)
    unet, tok = refmodels.diffusers_unet(SD_V1.unet), refmodels.hf_tokenizer(folder / "_tok")
    scheduler = refmodels.reference_scheduler("plms")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    unet.save_config(folder / "unet")
    vae.save_config(folder / "vae")
    text.config.save_pretrained(folder / "text_encoder")
    tok.save_pretrained(folder / "tokenizer")
    scheduler.save_config(folder / "scheduler")
    pipe.save_config(folder)  # model_index.json
    for f in (folder / "_tok").iterdir():
        f.unlink()
    (folder / "_tok").rmdir()


# ---------------------------------------------------------------------------- measuring children


def _touch(modules) -> float:
    """Read every weight (what inference does): mmap'd pages become resident."""
    import torch

    total = 0.0
    with torch.no_grad():
        for m in modules:
            for t in [*m.parameters(), *m.buffers()]:
                total += float(t.sum())  # reduces in place: no converted copy of the tensor
    return total


def _check_diffusers(pipe, path: str):
    """A deferred check that diffusers really loaded this file's weights (compared bit for bit)."""

    def check():
        import torch

        from sdlite.tensorfile import load_pickle, load_safetensors

        sd = load_safetensors(path)[0] if path.endswith(".safetensors") else load_pickle(path)["state_dict"]
        pairs = [(pipe.unet.conv_in.weight, "model.diffusion_model.input_blocks.0.0.weight"),
                 (pipe.vae.decoder.conv_out.weight, "first_stage_model.decoder.conv_out.weight"),
                 (next(p for n, p in pipe.text_encoder.named_parameters() if n.endswith("final_layer_norm.weight")),
                  "cond_stage_model.transformer.text_model.final_layer_norm.weight")]
        for mine, key in pairs:
            assert torch.equal(mine, sd[key]), f"diffusers loaded a different {key}"

    return check


def child(name: str, path: str | None, config: str | None) -> dict:
    t0 = time.perf_counter()
    stages = {}
    import torch

    import sdlite  # noqa: F401  (the baseline counts it)

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    stages["import"] = proc_status()["VmRSS"]
    note, load_s, after = None, None, []
    if name == "baseline":
        pass
    elif name == "baseline-diffusers":
        from diffusers import StableDiffusionPipeline  # noqa: F401

        stages["import_diffusers"] = proc_status()["VmRSS"]
    elif name in ("sdlite", "sdlite-fp16", "sdlite-cast-fp16"):
        dtype = torch.float32 if name == "sdlite" else torch.float16
        t1 = time.perf_counter()
        ck = sdlite.open_checkpoint(path)
        stages["open"] = proc_status()["VmRSS"]
        models = [ck.load(c, dtype=dtype) for c in ("text", "unet", "vae")]
        stages["load"] = proc_status()["VmRSS"]
        load_s = time.perf_counter() - t1
        assert all(p.dtype == dtype for m in models for p in m.parameters())
        _touch(models)
        stages["touch"] = proc_status()["VmRSS"]
    elif name == "diffusers":
        from diffusers import StableDiffusionPipeline

        stages["import_diffusers"] = proc_status()["VmRSS"]
        t1 = time.perf_counter()
        pipe = StableDiffusionPipeline.from_single_file(path, config=config, local_files_only=True,
                                                        safety_checker=None, torch_dtype=torch.float32)
        stages["load"] = proc_status()["VmRSS"]
        load_s = time.perf_counter() - t1
        note = "StableDiffusionPipeline.from_single_file(config=<local folder>, local_files_only=True)"
        _touch([pipe.text_encoder, pipe.unet, pipe.vae])
        stages["touch"] = proc_status()["VmRSS"]
        after = [_check_diffusers(pipe, path)]  # after the measurement: it maps the file once more
    else:
        raise SystemExit(f"unknown child {name}")
    status = proc_status()
    for check in after:
        check()
    out = {"name": name, "path": path, "peak_rss": status["VmHWM"], "rss": status["VmRSS"],
           "rss_anon": status["RssAnon"], "rss_file": status["RssFile"], "stages_rss": stages,
           "seconds": time.perf_counter() - t0}
    if load_s is not None:
        out["load_seconds"] = load_s
    if note:
        out["note"] = note
    return out


def run_child(name: str, path: Path | None = None, config: Path | None = None, timeout: int = 600) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name]
    if path is not None:
        cmd += ["--path", str(path)]
    if config is not None:
        cmd += ["--config", str(config)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        return {"name": name, "path": str(path) if path else None, "error": tail, "wall_seconds": wall}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = wall  # incl. interpreter start and imports
    return result


# ---------------------------------------------------------------------------- driver


def _fmt_row(r: dict) -> str:
    if "error" in r:
        return f"| {r['label']} | {r.get('file_gib', '')} | error | | | | |"
    ratio = f"{r['ratio']:.3f}" if r.get("ratio") is not None else "-"
    over = f"{r['ratio_minus_baseline']:.3f}" if r.get("ratio_minus_baseline") is not None else "-"
    load = f"{r['load_seconds']:.1f}" if "load_seconds" in r else "-"
    fsize = f"{r['file_bytes'] / GiB:.3f}" if r.get("file_bytes") else "-"
    return (f"| {r['label']} | {fsize} | {r['peak_rss'] / GiB:.3f} | {ratio} | {over} "
            f"| {r['rss_anon'] / GiB:.3f} / {r['rss_file'] / GiB:.3f} | {load} | {r['wall_seconds']:.1f} |")


def markdown(summary: dict) -> str:
    head = ("| child | file GiB | peak RSS GiB | peak / file | (peak - baseline) / file | "
            "anon / file-backed RSS at end GiB | load s | wall s |\n|---|---|---|---|---|---|---|---|")
    return head + "\n" + "\n".join(_fmt_row(r) for r in summary["children"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=str(ROOT / ".cache" / "bench"))
    ap.add_argument("--keep", action=argparse.BooleanOptionalAction, default=True,
                    help="keep the generated checkpoints for re-runs (default); --no-keep deletes them")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "load_memory.json"))
    ap.add_argument("--formats", default="safetensors,ckpt")
    ap.add_argument("--skip-diffusers", action="store_true", help="measure sdlite only")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child == "make":
        make_files(Path(args.path), args.formats.split(","))
        return 0
    if args.child == "make-config":
        make_diffusers_config(Path(args.path))
        return 0
    if args.child:
        print(json.dumps(child(args.child, args.path, args.config)))
        return 0

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if bad := set(formats) - {"safetensors", "ckpt"}:
        ap.error(f"unknown formats {sorted(bad)}")
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    # Creation runs in its own process too, so this driver never holds the weights.
    subprocess.run([sys.executable, __file__, "--child", "make", "--path", str(workdir), "--formats", ",".join(formats)],
                   check=True, env=env)
    config = workdir / "diffusers-sd15-config"
    if not args.skip_diffusers and not (config / "model_index.json").exists():
        subprocess.run([sys.executable, __file__, "--child", "make-config", "--path", str(config)], check=True, env=env)
    make_s = time.perf_counter() - t0

    files = {"safetensors": workdir / "sd15-fp32.safetensors", "ckpt": workdir / "sd15-fp32.ckpt"}
    fp16 = workdir / "sd15-fp16.safetensors"
    plan = [("baseline", "baseline (import torch+sdlite)", None)]
    if not args.skip_diffusers:
        plan.append(("baseline-diffusers", "baseline (+ import diffusers)", None))
    for fmt in formats:
        plan.append(("sdlite", f"sdlite fp32 .{fmt}", files[fmt]))
    plan.append(("sdlite-fp16", "sdlite fp16 .safetensors (stored dtype)", fp16))
    plan.append(("sdlite-cast-fp16", "sdlite fp32 .safetensors cast to fp16 at load", files["safetensors"]))
    if not args.skip_diffusers:
        for fmt in formats:
            plan.append(("diffusers", f"diffusers from_single_file fp32 .{fmt}", files[fmt]))

    results = []
    for name, label, path in plan:
        print(f"[run] {label} ...", file=sys.stderr, flush=True)
        r = run_child(name, path, config if name == "diffusers" else None)
        r["label"] = label
        results.append(r)
    base = next(r for r in results if r["name"] == "baseline" and "error" not in r)
    for r in results:
        if r["name"].startswith("baseline") or "error" in r:
            continue
        r["file_bytes"] = Path(r["path"]).stat().st_size
        r["ratio"] = r["peak_rss"] / r["file_bytes"]
        r["ratio_minus_baseline"] = (r["peak_rss"] - base["peak_rss"]) / r["file_bytes"]
        if r["name"].startswith("sdlite"):
            r["meets_target"] = r["ratio"] <= TARGET

    fp32_bytes = files["safetensors"].stat().st_size
    summary = {
        "benchmark": "load_memory",
        "target": f"sdlite peak RSS <= {TARGET} x file size",
        "file_bytes": fp32_bytes, "file_gib": fp32_bytes / GiB,
        "fp16_file_bytes": fp16.stat().st_size,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")},
        "setup_seconds": make_s,
        "children": results,
    }
    try:
        import diffusers
        import torch

        summary["versions"] = {"torch": torch.__version__, "diffusers": diffusers.__version__}
    except ImportError:
        pass
    print(json.dumps(summary, indent=1))
    print()
    print(markdown(summary))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\nwrote {out}", file=sys.stderr)
    if not args.keep:
        for p in (*files.values(), fp16):
            p.unlink(missing_ok=True)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
