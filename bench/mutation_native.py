"""Mutation check of the native kernels: C++ (csrc/) and Triton (kernels/).

    python bench/mutation_native.py [--only PATTERN] [--list] [--keep]

Each mutant below is one exact text substitution in one kernel file: a wrong accumulator
term, a dropped SIMD lane or tile, an off-by-one in a scalar tail or a mask (and a few more).
The script copies the source tree to a temporary directory, builds the extension there and
runs the kernel tests on the unmutated copy (they must pass, so a broken environment cannot
pass for kills). Then, for each mutant: patch the copy, rebuild the extension (C++ mutants),
run the tests that cover that kernel with -x, restore the file (always, checking its bytes).
Outcomes: killed (a test failed), survived (the tests passed), invalid (the mutant does not
build: fix the mutant), error (pytest could not run). A snippet that does not occur exactly
once fails the script at once, so a refactor cannot leave a mutant testing nothing.

Prints a table and exits non-zero unless every mutant is killed. Not part of CI: it rebuilds
the extension for every C++ mutant (about 10 minutes on 2 cores). Without a GPU the Triton
kernels run under TRITON_INTERPRET=1 (tests/conftest.py sets it). The f16c-* mutants live in
the float16 path taken on CPUs with AVX2 and F16C; elsewhere they survive.
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPIED = ("csrc", "kernels", "slug_fast", "tests", "setup.py", "pyproject.toml")


@dataclass(frozen=True)
class Mutant:
    name: str
    kernel: str
    file: str
    old: str
    new: str


def pytest_args(kernel: str) -> list[str]:
    """The tests that exercise `kernel` (-k also matches module names: `test_stats` is the whole file)."""
    return {
        "layer_sums cpp": ["tests/test_ops.py", "tests/test_stats.py", "-k",
                           "layer_sums or (test_stats and not triton)"],
        "axpy_into cpp": ["tests/test_ops.py", "tests/test_edit.py", "-k", "axpy or (test_edit and not triton)"],
        "widen cpp": ["tests/test_ops.py", "tests/test_stats.py", "tests/test_edit.py", "-k",
                      "layer_sums or axpy or ((test_stats or test_edit) and not triton)"],
        "pareto_front cpp": ["tests/test_ops.py", "tests/test_pareto.py", "-k", "test_pareto",
                             "--deselect", "tests/test_pareto.py::test_hundred_thousand_points_every_backend"],
        "layer_sums triton": ["tests/test_stats.py", "tests/test_kernels.py", "-k", "triton or (test_kernels and not sm90)"],
        "axpy triton": ["tests/test_edit.py", "tests/test_kernels.py", "-k", "triton or (test_kernels and not sm90)"],
        "tables triton": ["tests/test_kernels.py", "-k", "not sm90"],
    }[kernel]


MUTANTS = [
    # C++ layer_sums: chunk_sums (float32/float64/bfloat16, 2 x 4-lane float64 vectors + scalar tail)
    Mutant("sums-acc-term", "layer_sums cpp", "csrc/stats.cpp",
           "        fr[v] += f * r;", "        fr[v] += f * f;"),
    Mutant("sums-drop-lane", "layer_sums cpp", "csrc/stats.cpp",
           "    for (int l = 0; l < 4; ++l) {", "    for (int l = 0; l < 3; ++l) {"),
    Mutant("sums-drop-vector", "layer_sums cpp", "csrc/stats.cpp",
           "  for (int v = 0; v < kVecs; ++v) {\n    for (int l",
           "  for (int v = 0; v < kVecs - 1; ++v) {\n    for (int l"),
    Mutant("sums-tail-off-by-one", "layer_sums cpp", "csrc/stats.cpp",
           "  for (; i < n; ++i) {\n    const double t", "  for (; i + 1 < n; ++i) {\n    const double t"),
    # C++ layer_sums, float16 with F16C: 8-lane widening into 512-element blocks
    Mutant("f16c-drop-lane", "layer_sums cpp", "csrc/stats.cpp",
           "_mm256_store_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));",
           "_mm256_store_ps(dst + i, _mm256_blend_ps(_mm256_setzero_ps(), "
           "_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))), 0x7F));"),
    Mutant("f16c-drop-block", "layer_sums cpp", "csrc/stats.cpp",
           "for (int64_t first = 0; first < n; first += kBlock)",
           "for (int64_t first = 0; first + kBlock <= n; first += kBlock)"),
    Mutant("f16c-tail-off-by-one", "layer_sums cpp", "csrc/stats.cpp",
           "std::min(kBlock, n - first);", "std::min(kBlock, n - first - 1);"),
    Mutant("f16c-widen-tail-off-by-one", "layer_sums cpp", "csrc/stats.cpp",
           "for (; i < m; ++i) dst[i] = _cvtsh_ss(h[i]);",
           "for (; i + 1 < m; ++i) dst[i] = _cvtsh_ss(h[i]);\n  if (i < m) dst[i] = 0.0f;"),
    # simd.h: bfloat16 widening, used by layer_sums and axpy_into
    Mutant("widen-bf16-term", "widen cpp", "csrc/simd.h",
           "uint32_t bits = static_cast<uint32_t>(x.x) << 16;",
           "uint32_t bits = static_cast<uint32_t>(x.x & 0xFF80) << 16;"),
    # C++ axpy_into: one auto-vectorised loop per parallel chunk
    Mutant("axpy-acc-term", "axpy_into cpp", "csrc/update.cpp",
           "const A scaled = step * static_cast<A>(widen(x[i]));",
           "const A scaled = step * static_cast<A>(widen(b[i]));"),
    Mutant("axpy-drop-lane", "axpy_into cpp", "csrc/update.cpp",
           "    o[i] = static_cast<T>(", "    if ((i & 7) != 7) o[i] = static_cast<T>("),
    Mutant("axpy-drop-tile", "axpy_into cpp", "csrc/update.cpp",
           "axpy_range<T, scalar_t>(o, b, d, s, begin, end);",
           "axpy_range<T, scalar_t>(o, b, d, s, begin, std::min(end, begin + kGrain));"),
    Mutant("axpy-tail-off-by-one", "axpy_into cpp", "csrc/update.cpp",
           "for (int64_t i = begin; i < end; ++i)", "for (int64_t i = begin; i + 1 < end; ++i)"),
    # C++ pareto_front: sort by alignment, sweep groups of equal alignment
    Mutant("pareto-acc-term", "pareto_front cpp", "csrc/pareto.cpp",
           "best_before = std::max(best_before, group_best);", "best_before = group_best;"),
    Mutant("pareto-drop-group-lane", "pareto_front cpp", "csrc/pareto.cpp",
           "      group_best = std::max(group_best, m[i]);",
           "      if (end == g) group_best = std::max(group_best, m[i]);"),
    Mutant("pareto-tail-off-by-one", "pareto_front cpp", "csrc/pareto.cpp",
           "while (g < order.size())", "while (g + 1 < order.size())"),
    Mutant("pareto-tie-off-by-one", "pareto_front cpp", "csrc/pareto.cpp",
           "if (!(best_before > m[i]))", "if (!(best_before >= m[i]))"),
    Mutant("pareto-nan-filter", "pareto_front cpp", "csrc/pareto.cpp",
           "if (!std::isnan(a[i]) && !std::isnan(m[i]))", "if (!std::isnan(a[i]))"),
    # Triton layer_sums: tiles of ITERS blocks of BLOCK lanes (full tiles unmasked), then a combine kernel
    Mutant("tl-sums-acc-term", "layer_sums triton", "kernels/stats.py",
           "            fr += f * r", "            fr += r * r"),
    Mutant("tl-sums-drop-tile", "layer_sums triton", "kernels/stats.py",
           "for it in tl.static_range(ITERS):", "for it in tl.static_range(ITERS - 1):"),
    Mutant("tl-sums-drop-lane", "layer_sums triton", "kernels/stats.py",
           "            mask = offs < n\n", "            mask = (offs < n) & (lanes < BLOCK - 1)\n"),
    Mutant("tl-sums-full-drop-lane", "layer_sums triton", "kernels/stats.py",
           "            f = tl.load(gf + offs).to(ACC)",
           "            f = tl.load(gf + offs, mask=lanes < BLOCK - 1, other=0.0).to(ACC)"),
    Mutant("tl-sums-mask-off-by-one", "layer_sums triton", "kernels/stats.py",
           "            mask = offs < n\n", "            mask = offs < n - 1\n"),
    Mutant("tl-sums-masked-other", "layer_sums triton", "kernels/stats.py",
           "t = tl.load(theta + offs, mask=mask, other=0.0)", "t = tl.load(theta + offs, mask=mask, other=1.0)"),
    Mutant("tl-combine-off-by-one", "layer_sums triton", "kernels/stats.py",
           "mask=(idx < count)[:, None]", "mask=(idx + 1 < count)[:, None]"),
    Mutant("tl-combine-drop-chunk", "layer_sums triton", "kernels/stats.py",
           "for chunk in range(0, CHUNKS):", "for chunk in range(0, CHUNKS - 1):"),
    # Triton axpy: the same tiles, and bfloat16 rounding to nearest even by integer arithmetic
    Mutant("tl-axpy-acc-term", "axpy triton", "kernels/update.py",
           "scaled = step * tl.load(d + offs, mask=mask)", "scaled = step * tl.load(base + offs, mask=mask)"),
    Mutant("tl-axpy-full-acc-term", "axpy triton", "kernels/update.py",
           "scaled = step * tl.load(d + offs).to(COMPUTE)", "scaled = step * tl.load(base + offs).to(COMPUTE)"),
    Mutant("tl-axpy-drop-tile", "axpy triton", "kernels/update.py",
           "for it in tl.static_range(ITERS):", "for it in tl.static_range(ITERS - 1):"),
    Mutant("tl-axpy-drop-lane", "axpy triton", "kernels/update.py",
           "            mask = offs < n\n", "            mask = (offs < n) & (lanes < BLOCK - 1)\n"),
    Mutant("tl-axpy-full-drop-lane", "axpy triton", "kernels/update.py",
           "            tl.store(out + offs, y)\n", "            tl.store(out + offs, y, mask=lanes < BLOCK - 1)\n"),
    Mutant("tl-axpy-mask-off-by-one", "axpy triton", "kernels/update.py",
           "            mask = offs < n\n", "            mask = offs < n - 1\n"),
    Mutant("tl-bf16-round-ties", "axpy triton", "kernels/update.py",
           "(bits + 0x7FFF + ((bits >> 16) & 1)) >> 16", "(bits + 0x7FFF) >> 16"),
    # the cached tables: a key without the data pointers reuses another set's addresses
    Mutant("tl-tables-key-pointers", "tables triton", "kernels/tables.py",
           'array("q", map(torch.Tensor.data_ptr, flat)).tobytes()\n           + array("q", map(torch.Tensor.numel',
           'array("q", map(torch.Tensor.numel'),
]


def check_snippets(mutants: list[Mutant]) -> None:
    """Every original snippet occurs exactly once in its file; a mutant changes it."""
    for m in mutants:
        count = (ROOT / m.file).read_text().count(m.old)
        if count != 1 or m.old == m.new:
            sys.exit(f"mutant {m.name}: its snippet occurs {count} times in {m.file}; update the table")


def copy_tree(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "build", "*.egg-info", ".pytest_cache")
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, symlinks=True, ignore=ignore)  # slug_fast/kernels stays a link
        else:
            shutil.copy2(src, dest / name)


def env_for(tree: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1")
    env.setdefault("MAX_JOBS", "2")
    return env


def build(tree: Path) -> tuple[bool, str]:
    # --force: setuptools only compares the .cpp files' dates; ninja then rebuilds what changed, headers too
    done = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "--force"], check=False, cwd=tree,
                          env=env_for(tree), capture_output=True, text=True)
    return done.returncode == 0, done.stdout + done.stderr


def check_imports(tree: Path) -> None:
    """The tests will import the copy's extension and kernels, not an installed slug_fast."""
    code = "import slug_fast._C, slug_fast.kernels.stats as s; print(slug_fast._C.__file__); print(s.__file__)"
    done = subprocess.run([sys.executable, "-c", code], check=False, cwd=tree, env=env_for(tree),
                          capture_output=True, text=True)
    paths = done.stdout.split()
    if done.returncode or len(paths) != 2 or not all(Path(p).resolve().is_relative_to(tree.resolve()) for p in paths):
        sys.exit(f"the copy's slug_fast is not the one imported:\n{done.stdout}{done.stderr}")


def run_tests(tree: Path, args: list[str], stop_first: bool = True) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *(["-x"] if stop_first else []),
           *args]
    done = subprocess.run(cmd, check=False, cwd=tree, env=env_for(tree), capture_output=True, text=True)
    return done.returncode, done.stdout + done.stderr


def first_failure(output: str) -> str:
    found = re.search(r"^FAILED (\S+)", output, re.MULTILINE)
    return found.group(1).split("::", 1)[-1] if found else ""


def run_mutant(tree: Path, m: Mutant) -> tuple[str, str]:
    """(outcome, detail) of one mutant; the file is restored whatever happens."""
    path = tree / m.file
    original = path.read_bytes()
    try:
        path.write_bytes(original.replace(m.old.encode(), m.new.encode(), 1))
        if m.file.startswith("csrc/"):
            ok, log = build(tree)
            if not ok:
                errors = [ln for ln in log.splitlines() if "error" in ln]
                return "invalid", (errors[0] if errors else log[-300:]).strip()[:120]
        rc, out = run_tests(tree, pytest_args(m.kernel))
        if rc == 1:
            return "killed", first_failure(out)
        if rc == 0:
            return "survived", ""
        return "error", f"pytest exit {rc}: {out.strip().splitlines()[-1] if out.strip() else ''}"[:120]
    finally:
        path.write_bytes(original)
        assert path.read_bytes() == original, f"{path} was not restored"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", metavar="PATTERN", help="run the mutants whose names match (a glob: 'tl-*'; "
                        "see --list)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--keep", action="store_true", help="keep the temporary tree (its path is printed)")
    args = parser.parse_args()
    check_snippets(MUTANTS)
    if args.list:
        for m in MUTANTS:
            print(f"{m.kernel:18} {m.name:28} {m.file}")
        return 0
    mutants = [m for m in MUTANTS if args.only is None or fnmatch.fnmatchcase(m.name, args.only)]
    if not mutants:
        sys.exit(f"no mutant matches {args.only!r}; see --list")

    started = time.perf_counter()
    tree = Path(tempfile.mkdtemp(prefix="slug-mutants-"))
    try:
        copy_tree(tree)
        ok, log = build(tree)
        if not ok:
            sys.exit(f"the unmutated extension does not build:\n{log[-3000:]}")
        check_imports(tree)
        baseline = []
        for kernel in dict.fromkeys(m.kernel for m in mutants):
            t0 = time.perf_counter()
            rc, out = run_tests(tree, pytest_args(kernel), stop_first=False)
            if rc != 0:
                sys.exit(f"the unmutated tests of {kernel} fail (exit {rc}):\n{out[-3000:]}")
            baseline.append(f"{kernel} {time.perf_counter() - t0:.0f} s")
        print(f"unmutated tree passes ({', '.join(baseline)})", flush=True)

        rows = []
        stale = False  # the extension was last built from a mutated source
        for m in sorted(mutants, key=lambda m: m.file.startswith("csrc/")):  # Triton first: fewer rebuilds
            t0 = time.perf_counter()
            if stale and not m.file.startswith("csrc/"):
                ok, log = build(tree)
                if not ok:
                    sys.exit(f"the restored extension does not build:\n{log[-3000:]}")
            outcome, detail = run_mutant(tree, m)
            stale = m.file.startswith("csrc/")
            rows.append((m.kernel, m.name, outcome, time.perf_counter() - t0, detail))
            print(f"{m.kernel:18} {m.name:28} {outcome:8} {rows[-1][3]:6.1f} s  {detail}", flush=True)
    finally:
        if args.keep:
            print(f"tree kept at {tree}")
        else:
            shutil.rmtree(tree, ignore_errors=True)

    print(f"\n{'kernel':18} {'mutant':28} {'outcome':8} {'seconds':>7}")
    for kernel, name, outcome, secs, _ in rows:
        print(f"{kernel:18} {name:28} {outcome:8} {secs:7.1f}")
    counts = {o: sum(r[2] == o for r in rows) for o in ("killed", "survived", "invalid", "error")}
    print(", ".join(f"{n} {o}" for o, n in counts.items()) + f"; {time.perf_counter() - started:.0f} s in all")
    return 0 if counts["killed"] == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
