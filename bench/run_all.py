"""Run every benchmark script in bench/ and gather their results in one JSON and one markdown file.

    .venv/bin/python bench/run_all.py [--full] [--threads N] [--out bench/out/results.json]
                                      [--only convert,onnx] [--timeout S] [--verbose]

``make bench`` runs it with the scripts' ``--quick`` sizes (the default here); ``make bench
FULL=1`` passes ``--full``: the scripts' own default sizes (far longer).

Every ``bench/bench_*.py`` runs in its own subprocess as ``bench_X.py --json --threads N
[--quick]``, one after the other (they time things, so never two at once). Its stdout is its
JSON; its stderr goes to ``OUT_DIR/logs/bench_X.log``. A script that crashes, exits non-zero,
times out or prints no JSON is recorded as failed with the tail of its stderr, the others
still run, and run_all exits non-zero at the end. A script can fail and still have printed
its JSON (bench_onnx.py when only its plot failed): the results are kept with the failure.

Written (and rewritten after each script, so an interrupted run keeps what finished):
  OUT                     {"run": ..., "environment": ..., "scripts": {"onnx": {...}, ...},
                           "failed": [...]}; each script's record holds its JSON under "result"
  OUT with suffix .md     the README-style tables built from that JSON (printed at the end too)
No wall-clock threshold is asserted anywhere; the tables show what each script measured.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import environment, set_threads

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
TAIL_CHARS = 3000  # stderr kept in the JSON for a failed script (the whole of it is in its log)


def log(msg: str) -> None:
    print(f"[run_all {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def scripts() -> dict[str, Path]:
    """name -> path of every bench/bench_NAME.py: a new script is picked up without an edit here."""
    return {p.stem.removeprefix("bench_"): p for p in sorted(BENCH.glob("bench_*.py"))}


def extra_args(name: str, out_dir: Path) -> list[str]:
    """Arguments beyond --json/--threads/--quick that one script gets."""
    if name == "onnx":  # the plot of the README, from this run's numbers
        return ["--plot", str(out_dir / "onnx_decode.png")]
    return []


# --------------------------------------------------------------------------- running one script


def run_script(name: str, path: Path, args, out_dir: Path) -> dict:
    """Run one script to completion (or its timeout); returns its record for the JSON."""
    cmd = [sys.executable, str(path), "--json", "--threads", str(args.threads),
           *([] if args.full else ["--quick"]), *extra_args(name, out_dir)]
    log_path = out_dir / "logs" / f"{path.stem}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    rec = {"script": path.name, "command": [Path(cmd[0]).name, *cmd[1:]], "log": _rel(log_path)}
    log(f"{path.name}: started (stderr in {_rel(log_path)})")
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the log follows the run, for `tail -f`
    with open(log_path, "wb") as logf:
        # its own session: on a timeout or Ctrl-C the whole process group (its own
        # subprocesses included, as bench_convert's) is ended, and Ctrl-C reaches us only
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        out_chunks: list[bytes] = []
        readers = [threading.Thread(target=_drain, args=(proc.stdout, [out_chunks.append]), daemon=True),
                   threading.Thread(target=_drain, args=(proc.stderr, [logf.write] + ([_echo] if args.verbose else [])),
                                    daemon=True)]
        for t in readers:
            t.start()
        status = None
        try:
            proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            status = f"timed out after {args.timeout:g} s"
            _kill(proc)
        except KeyboardInterrupt:
            _kill(proc)
            raise
        for t in readers:
            t.join()
    rec["wall_s"] = round(time.perf_counter() - t0, 1)
    rec["returncode"] = proc.returncode
    stdout = b"".join(out_chunks).decode(errors="replace")
    rec["result"], parse_error = parse_json(stdout)
    if status is None and proc.returncode != 0:
        status = f"exit status {proc.returncode}"
    if status is None and parse_error:
        status = parse_error
    rec["status"] = "ok" if status is None else "failed"
    if status is not None:
        rec["stderr_tail"] = _tail(log_path)
        if rec["result"] is None and stdout.strip():
            rec["stdout_tail"] = stdout[-TAIL_CHARS:]
        # the last line a failing script wrote is nearly always the reason (the exception, or
        # bench_onnx's one line about its plot)
        last = next((ln.strip() for ln in reversed(rec["stderr_tail"].splitlines()) if ln.strip()), "")
        rec["error"] = f"{status}: {last[:200]}" if last else status
        log(f"{path.name}: FAILED after {rec['wall_s']:.1f} s ({rec['error']})"
            + ("; its JSON results were kept" if rec["result"] is not None else ""))
    else:
        log(f"{path.name}: ok in {rec['wall_s']:.1f} s")
    return rec


def _drain(stream, sinks) -> None:
    for chunk in iter(lambda: stream.read1(65536), b""):
        for sink in sinks:
            sink(chunk)


def _echo(chunk: bytes) -> None:
    sys.stderr.buffer.write(chunk)
    sys.stderr.buffer.flush()


def _kill(proc: subprocess.Popen) -> None:
    """SIGTERM to the script's process group, SIGKILL if it is still there 10 s later."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def parse_json(stdout: str) -> tuple[dict | None, str | None]:
    """The script's JSON object, and an error when there is none. A script's stdout should be
    the JSON alone; if something printed before it, the JSON is the object that starts at the
    beginning of a line and runs to the end of the output."""
    text = stdout.strip()
    if not text:
        return None, "no output on stdout (no JSON)"
    dec = json.JSONDecoder()
    starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n" and text.startswith("{", i + 1)]
    for i in starts:
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and not text[end:].strip():
            return obj, None
    return None, "stdout is not a JSON object"


def _tail(path: Path) -> str:
    data = path.read_bytes()[-4 * TAIL_CHARS:].decode(errors="replace")
    # progress bars redraw with \r: keep only what each line finally showed
    lines = [ln.rsplit("\r", 1)[-1] for ln in data.replace("\r\n", "\n").split("\n")]
    return "\n".join(lines)[-TAIL_CHARS:]


def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(REPO))
    except ValueError:
        return str(p)


# --------------------------------------------------------------------------- environment


def run_environment(threads: int) -> dict:
    env = environment()
    env["threads"] = threads
    for pkg in ("transformers", "onnxruntime", "onnx", "rwkv"):
        try:
            env[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            env[pkg] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True)
        env["git_commit"] = commit.stdout.strip()
        env["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        env["git_commit"] = None
    return env


# --------------------------------------------------------------------------- markdown


def md_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(x) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"
    return str(x).replace("|", "\\|").replace("\n", " ")  # an error message must not break the row


def num(x, nd: int = 2) -> str:
    """x with nd decimals; a dash for a missing figure."""
    return "–" if x is None else f"{x:.{nd}f}"


def best(t: dict | None) -> float | None:
    return None if t is None else t["best"]


def count_contended(obj) -> tuple[int, int]:
    """(timings that had to keep contended samples, all timings) anywhere in a result."""
    if isinstance(obj, dict):
        if "kept_contended" in obj and "samples" in obj:
            return int(bool(obj["kept_contended"])), 1
        pairs = [count_contended(v) for v in obj.values()]
    elif isinstance(obj, list):
        pairs = [count_contended(v) for v in obj]
    else:
        return 0, 0
    return sum(p[0] for p in pairs), sum(p[1] for p in pairs)


def md_convert(r: dict) -> str:
    s = r["shape"]
    met = {True: "met", False: "**missed**"}
    head = (f"`RwkvForCausalLM` ({s['num_hidden_layers']} x {s['hidden_size']}, vocab {s['vocab_size']}; "
            f"{r['source_weights_mb']:.1f} MB of safetensors), {r['rounds']} interleaved rounds, page cache warm.")
    table = md_table(["what", "best", "median"], [
        ["`cp -r` (s)", num(r["cp_s"]["best"], 3), num(r["cp_s"]["median"], 3)],
        ["`pull()` (s)", num(r["convert_s"]["best"], 3), num(r["convert_s"]["median"], 3)],
        ["`pull()` incl. imports (s)", num(r["convert_with_imports_s"]["best"], 2), num(r["convert_with_imports_s"]["median"], 2)],
        ["cp / pull", num(r["speed_ratio_best"]), num(r["speed_ratio_median"])],
        ["pull throughput (MB/s)", num(r["convert_mb_per_s_best"], 0), num(r["convert_mb_per_s_median"], 0)],
    ])
    tail = (f"Peak RSS {r['peak_rss_mb']:.0f} MB, {r['rss_over_baseline_mb']:.0f} MB over the interpreter with torch "
            f"imported (limit {r['rss_limit_mb']:.0f} MB = 2 x the largest tensor + 400: {met[r['rss_ok']]}); "
            f"speed target {r['speed_target']} (median): {met[r['speed_ok']]}.")
    return f"{head}\n\n{table}\n\n{tail}"


def md_decode(r: dict) -> str:
    m = r["model"]
    head = (f"`{r['shape']}` ({m['n_layer']} layers), one token per step, {r['steps']} steps after a "
            f"{r['prompt']}-token prompt (ms/token):")
    floor = f"{num(r['floor_ms_per_token'], 1)} ({r['weight_bytes_per_token'] / 1e6:.0f} MB at {r['matvec_bandwidth_GBps']:.1f} GB/s)"
    table = md_table(
        ["model", "statecast step", "floor (weight bytes / bandwidth)", "matvec floor", "transformers `generate`",
         "statecast / floor", "transformers / statecast", "greedy tokens equal"],
        [[r["shape"], num(r["statecast_ms_per_token"], 1), floor, num(r["matvec_floor_ms_per_token"], 1),
          num(r["transformers_ms_per_token"], 1), num(r["statecast_over_floor"]), num(r["transformers_over_statecast"]),
          r["greedy_tokens_agreeing"]]])
    return f"{head}\n\n{table}"


def md_prefill(r: dict) -> str:
    m = r["model"]
    rows = [[r["shape"], x["T"], num(best(x["statecast_s"]), 3), num(best(x["floor_s"]), 3), num(best(x["floor_alloc_s"]), 3),
             num(best(x["transformers_s"]), 3), num(x["statecast_over_floor"]), num(x["transformers_over_statecast"]),
             _cell(x["max_abs_logit_diff"])] for x in r["results"]]
    out = [f"`{r['shape']}` ({m['n_layer']} layers), whole-sequence forward (seconds, best of the repeats):", "",
           md_table(["model", "T", "statecast", "GEMM floor", "floor alloc", "transformers", "statecast / floor",
                     "transformers / statecast", "max abs logit diff"], rows)]
    wkv = [[x["T"], name, num(d["one_layer"]["best"] * 1e3, 2), num(d["all_layers_s"], 3),
            num(d["all_layers_s"] / x["statecast_s"]["best"])]
           for x in r["results"] for name, d in x.get("wkv_alone", {}).items()]
    if wkv:
        out += ["", f"WKV alone, one layer's shape, x {m['n_layer']} layers:", "",
                md_table(["T", "variant", "ms / layer", "all layers (s)", "share of statecast forward"], wkv)]
    return "\n".join(out)


def md_scan(r: dict) -> str:
    c = r["config"]
    runs = r["runs"]
    out = [f"Mamba, {c['n_layer']} layers x {c['d_model']} (E={c['d_inner']}, N={c['d_state']}), vocab {c['vocab_size']}."]
    fw = [run for run in runs if "forward" in run]
    if fw:
        rows = []
        for run in fw:
            floor = run["forward"]["GEMM floor"]["best"]
            rows += [[run["T"], name, num(t["best"], 3), num(t["median"], 3), num(t["best"] / floor)]
                     for name, t in run["forward"].items()]
            if "hf_est" in run:
                rows.append([run["T"], "transformers (est.: blocks x one block + the rest)", num(run["hf_est"], 3), "",
                             num(run["hf_est"] / floor)])
            if "hf_full" in run:
                rows.append([run["T"], "transformers (whole forward, once)", num(run["hf_full"]["best"], 3), "",
                             num(run["hf_full"]["best"] / floor)])
        out += ["", "Full forward (seconds):", "", md_table(["T", "what", "best", "median", "/ GEMM floor"], rows)]
    names = list(runs[0]["scan"]) if runs else []
    rows = []
    for name in names:
        acc = r["accuracy"].get(name)
        rows.append([name, *(num(run["scan"][name]["best"] * 1e3, 1) for run in runs),
                     acc if isinstance(acc, str) else f"{acc:.0e}"])
    if rows:
        out += ["", "Scan alone, one layer (ms, best); relative error vs the float64 sequential scan at T=96:", "",
                md_table(["algorithm", *(f"T={run['T']}" for run in runs), "rel err"], rows)]
    if r.get("compiled_error"):
        out += ["", f"Compiled scan not available: {r['compiled_error']}"]
    return "\n".join(out)


def md_state(r: dict) -> str:
    res = r["results"]
    out = []
    for hybrid, dense in r.get("pairs", [["jamba-small", "llama-16l"]]):
        h, t = res[hybrid], res[dense]
        rows = []
        for a, b in zip(h["contexts"], t["contexts"]):
            P = a["context"]
            mib = [f"{x['formula_bytes'] / 2**20:.1f} MiB" + ("" if x["state_bytes"] else " (formula)") for x in (a, b)]
            rows.append([f"{P // 1024}K" if P % 1024 == 0 else P, *mib, f"{b['formula_bytes'] / a['formula_bytes']:.1f}x",
                         num(a["ms_per_token"], 1), num(b["ms_per_token"], 1)])
        out.append(f"Decode state and step time: `{hybrid}` ({h['n_params'] / 1e6:.0f}M parameters) against `{dense}` "
                   f"({t['n_params'] / 1e6:.0f}M), batch 1, fp32:\n\n"
                   + md_table(["context", "hybrid state", "Transformer state", "Transformer / hybrid",
                               "hybrid ms/token", "Transformer ms/token"], rows))
    return "\n\n".join(out)


def md_onnx(r: dict) -> str:
    pos = [str(P) for P in r["positions"]]
    p0, pN = pos[0], pos[-1]
    res = r["results"]
    rows = []
    for s, x in res.items():
        for dt in ("fp32", "int8"):
            rows.append([s if dt == "fp32" else "", dt, *(num(x["ms_per_token"][dt][P], 1) for P in pos),
                         num(x["growth"][dt])])
    out = [f"One token per `session.run` (onnxruntime {r['onnxruntime']}, {r['threads']} threads, batch 1); ms/token, "
           f"best of {r['repeats']} rounds of {r['calls_per_sample']} calls; ratios: median over rounds of the "
           "within-round ratio.", "",
           md_table(["model", "graph", *(f"P={P}" for P in pos), f"{pN} / {p0}"], rows)]
    rows = []
    for s, x in res.items():
        pkg = x.get("rwkv_package_ms_per_token")
        rows.append([s, num(x["weight_bytes_per_token"] / 1e6, 0), num(x["floor_ms_per_token"], 1),
                     num(x["read_floor_ms_per_token"], 1), num(x["ms_per_token"]["fp32"][p0], 1), num(x["fp32_over_floor"]),
                     num(x["fp32_over_read_floor"]), num(x["ms_per_token"]["int8"][p0], 1),
                     num(x["transformers_ms_per_token"], 1), num(x["transformers_over_fp32"]), num(x["transformers_over_int8"]),
                     num(pkg, 1), num(x.get("rwkv_package_over_fp32"))])
    out += ["", f"At P={p0} against the floor, transformers `generate` and the `rwkv` package (ms/token):", "",
            md_table(["model", "MB / token", "floor", "read floor", "ONNX fp32", "fp32 / floor", "fp32 / read floor",
                      "ONNX int8", "transformers", "transformers / fp32", "transformers / int8", "`rwkv` package",
                      "package / fp32"], rows)]
    out += ["", "Targets:", ""] + [f"- {line}" for line in r["targets"]]
    if r.get("plot") and Path(r["plot"]).is_file():
        out += ["", f"Plot: `{_rel(Path(r['plot']))}`"]
    return "\n".join(out)


def md_mamba2(r: dict) -> str:
    m, dec = r["model"], r["decode"]
    out = [f"Mamba-2, {m['n_layer']} layers x {m['d_model']} (H={m['n_heads']} x P={m['head_dim']}, N={m['d_state']}, "
           f"G={m['n_groups']}), vocab {m['vocab_size']}; SSD chunk Q={r['ssd_chunk']}.", ""]
    rows = [[x["T"], num(best(x["floor_s"]), 3), num(best(x["statecast_s"]), 3), num(x["statecast_over_floor"]),
             num(best(x["transformers_s"]), 3) if x["transformers_s"] else "–",
             num(x["transformers_over_floor"]) if x["transformers_over_floor"] else "–"] for x in r["prefill"]]
    out += [md_table(["T", "GEMM floor s", "statecast s", "/ floor", "transformers s", "/ floor"], rows), ""]
    rows = [[x["T"], name, num(best(v["one_layer"]) * 1e3, 1)] for x in r["prefill"] for name, v in x["ssd_alone"].items()]
    out += ["SSD alone, one layer (ms, best):", "", md_table(["T", "algorithm", "ms"], rows), ""]
    rows = [[p, num(dec["ms_per_token"][str(p)] if str(p) in dec["ms_per_token"] else dec["ms_per_token"][p]),
             num(dec["over_floor"][str(p)] if str(p) in dec["over_floor"] else dec["over_floor"][p])]
            for p in dec["positions"]]
    out += [f"Decode (ms/token; floor {num(dec['floor_ms_per_token'])} ms = weight bytes / "
            f"{num(dec['matvec_bandwidth_GBps'], 1)} GB/s; long/short {num(dec['long_over_short'], 3)}):", "",
            md_table(["position", "ms/token", "/ floor"], rows)]
    return "\n".join(out)


RENDER = {"convert": md_convert, "decode": md_decode, "prefill": md_prefill, "scan": md_scan, "state": md_state,
          "onnx": md_onnx, "mamba2": md_mamba2}


def markdown(doc: dict) -> tuple[str, list[str]]:
    """The markdown of a results document, and the scripts whose tables could not be built."""
    env, run = doc["environment"], doc["run"]
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "transformers", "onnxruntime") if env.get(k))
    commit = env.get("git_commit")
    lines = ["# Benchmark results", "",
             f"{run['mode']} sizes, {env['processor']} ({env['cpus']} CPUs), {env['threads']} threads, {versions}, "
             f"Python {env['python']}; started {run['started']}"
             + (f", commit {commit[:10]}{' (with local changes)' if env.get('git_dirty') else ''}" if commit else "")
             + ". Each script's figures come from its own run; timings on a shared machine move between runs.", ""]
    rows = []
    for name, rec in doc["scripts"].items():
        kept, total = count_contended(rec.get("result"))
        rows.append([f"`{rec['script']}`", rec["status"] if rec["status"] == "ok" else f"**{rec['status']}**: {rec['error']}",
                     num(rec["wall_s"], 1), f"{kept} / {total}" if total else "–"])
    lines += [md_table(["script", "status", "wall s", "timings with contended samples kept"], rows)]
    broken = []
    for name, rec in doc["scripts"].items():
        lines += ["", f"## {name} (`{rec['script']}`)", ""]
        render = RENDER.get(name)
        if rec["result"] is None:
            lines.append(f"No results ({rec['error']}). The tail of its stderr is in the JSON, all of it in `{rec['log']}`.")
            continue
        if render is None:
            lines.append("No table is defined for this script in `run_all.py`; its results are in the JSON.")
        else:
            try:
                lines.append(render(rec["result"]))
            except Exception as e:  # noqa: BLE001 - a script's JSON changed shape: say so, keep the other tables
                broken.append(name)
                lines.append(f"Table not built ({type(e).__name__}: {e}); the results are in the JSON.")
        if rec["status"] != "ok":
            lines += ["", f"The script failed after printing these results ({rec['error']})."]
    return "\n".join(lines) + "\n", broken


# --------------------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="the scripts' full sizes (default: --quick)")
    p.add_argument("--threads", type=int, default=2, help="torch / onnxruntime threads per script (default 2)")
    p.add_argument("--out", type=Path, default=BENCH / "out" / "results.json", help="the JSON (markdown beside it, .md)")
    p.add_argument("--only", default=None, help="comma-separated scripts to run (convert,decode,...; default all)")
    p.add_argument("--timeout", type=float, default=None, help="seconds after which a script is stopped (default none)")
    p.add_argument("--verbose", action="store_true", help="echo the scripts' stderr as they run")
    args = p.parse_args()

    found = scripts()
    names = list(found)
    if args.only:
        names = [n.strip().removeprefix("bench_").removesuffix(".py") for n in args.only.split(",")]
        unknown = [n for n in names if n not in found]
        if unknown:
            p.error(f"unknown scripts {unknown}; there are {list(found)}")
    out_json = args.out.resolve()
    out_md = out_json.with_suffix(".md")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    set_threads(args.threads)
    mode = "full" if args.full else "quick"
    doc = {"run": {"mode": mode, "started": datetime.datetime.now().isoformat(timespec="seconds"),
                   "scripts": names, "wall_s": None},
           "environment": run_environment(args.threads), "scripts": {}, "failed": []}
    log(f"{mode} run of {len(names)} scripts: {', '.join(found[n].name for n in names)}; results in {_rel(out_json)}")
    t0 = time.perf_counter()
    interrupted = False
    for name in names:
        try:
            rec = run_script(name, found[name], args, out_json.parent)
        except KeyboardInterrupt:
            log(f"interrupted during {found[name].name}; writing what finished")
            interrupted = True
            break
        doc["scripts"][name] = rec
        if rec["status"] != "ok":
            doc["failed"].append(name)
        doc["run"]["wall_s"] = round(time.perf_counter() - t0, 1)
        write(doc, out_json, out_md)  # after each script: a later crash or Ctrl-C loses nothing that finished
    doc["run"]["wall_s"] = round(time.perf_counter() - t0, 1)
    if interrupted:
        doc["run"]["interrupted"] = True
    md, broken = write(doc, out_json, out_md)
    print(md)
    log(f"wrote {_rel(out_json)} and {_rel(out_md)}; {len(doc['scripts'])} scripts in {doc['run']['wall_s']:.0f} s")
    if doc["failed"]:
        log(f"FAILED: {', '.join(doc['failed'])} (see the logs under {_rel(out_json.parent / 'logs')})")
    if broken:
        log(f"tables not built for: {', '.join(broken)} (their JSON changed shape?)")
    return 130 if interrupted else 1 if doc["failed"] or broken else 0


def write(doc: dict, out_json: Path, out_md: Path) -> tuple[str, list[str]]:
    out_json.write_text(json.dumps(doc, indent=2) + "\n")
    md, broken = markdown(doc)
    out_md.write_text(md)
    return md, broken


if __name__ == "__main__":
    sys.exit(main())
