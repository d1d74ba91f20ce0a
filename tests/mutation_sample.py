"""A reproducible random sample of mutmut's mutants, a fixed number per module, and its score.

The full mutation run (about 4,800 mutants, each starting JAX and compiling) takes many hours on a 2-core
machine, so ``make mutate-sample`` runs a fixed number of mutants per module, drawn with a fixed seed, and
``tests/MUTATION.md`` reports the sampled score per module. After ``mutmut`` has generated its mutants
(``mutants/``)::

    python tests/mutation_sample.py 20            # the sample's names, one per line (for `mutmut run`)
    python tests/mutation_sample.py 20 --report   # the sample's results per module, as a Markdown table
    python tests/mutation_sample.py 8 --seed 1 --exclude 20   # a fresh sample, none of the first one's: the
                                  # score after tests were written for the first sample's survivors
    python tests/mutation_sample.py --recheck NAME [NAME ...] [-- TEST ...]

``--recheck`` runs one mutant at a time against whole test files in a fresh interpreter (the module's own test
files unless given): mutmut attributes a function called while the package is imported (the config schema's
field factories, say) to the one test that happened to import it first, so its mutants "survive" tests that
would kill them. A mutant killed here is counted as killed, and MUTATION.md says so. It first copies tests/ into
mutants/ and runs the same files with no mutant (a control: a test failing on its own would look like a kill).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

# mutmut's exit codes (mutmut/stats.py), except 255: mutmut counts it as a timeout, but it is the worker's own
# exception (an error before any test ran, e.g. a warning turned error by pytest), so a kill it is not.
_STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 24: "timeout", -24: "timeout",
           152: "timeout", 36: "timeout", 255: "error", None: "not run"}


def _metas(root: Path) -> list[Path]:
    return sorted(root.glob("funcgrad/**/*.py.meta"))


def sample(per_module: int, seed: int = 0, root: Path = Path("mutants"), exclude: frozenset[str] = frozenset()
           ) -> list[str]:
    """The names of ``per_module`` mutants drawn without replacement from each mutated module (none of
    ``exclude``)."""
    names: list[str] = []
    for meta in _metas(root):
        keys = sorted(set(json.loads(meta.read_text())["exit_code_by_key"]) - exclude)
        rng = random.Random(f"{seed}:{meta.relative_to(root)}")
        names += sorted(rng.sample(keys, min(per_module, len(keys))))
    return names


def _module(name: str) -> str:
    """The mutated module of a mutant's name: ``funcgrad.verify._fd.x__scale__mutmut_5`` → ``verify._fd``."""
    return name.split(".x", 1)[0].removeprefix("funcgrad.")


def results(names: list[str], root: Path = Path("mutants"), equivalent: frozenset[str] = frozenset()
            ) -> dict[str, Counter]:
    """Per module, how many of ``names`` were killed, survived, timed out, ... (mutmut's saved results), the
    ``equivalent`` ones counted as such."""
    codes: dict[str, int | None] = {}
    for meta in _metas(root):
        codes.update(json.loads(meta.read_text())["exit_code_by_key"])
    out: dict[str, Counter] = {}
    for name in names:
        status = "equivalent" if name in equivalent else _STATUS.get(codes.get(name), "other")
        out.setdefault(_module(name), Counter())[status] += 1
    return out


def report(names: list[str], equivalent: frozenset[str] = frozenset(), root: Path = Path("mutants")) -> str:
    """A Markdown table: per module, the sample's outcomes and the score (killed or timed out, over the
    mutants that are not ``equivalent``)."""
    rows = ["| module | sampled | killed | timeout | survived | no tests | equivalent | not run / error | score |",
            "|---|---|---|---|---|---|---|---|---|"]
    total: Counter = Counter()
    for module, c in sorted(results(names, root, equivalent).items()):
        total.update(c)
        rows.append(_row(module, c))
    rows.append(_row("**all**", total))
    return "\n".join(rows)


def _row(module: str, c: Counter) -> str:
    n = sum(c.values())
    caught = c["killed"] + c["timeout"]
    judged = caught + c["survived"] + c["no tests"]  # run and not equivalent
    score = f"{100 * caught / judged:.0f}%" if judged else "-"
    return (f"| {module} | {n} | {c['killed']} | {c['timeout']} | {c['survived']} | {c['no tests']} | "
            f"{c['equivalent']} | {n - judged - c['equivalent']} | {score} |")


_MUTATION_MD = Path(__file__).with_name("MUTATION.md")


def _equivalent(path: Path = _MUTATION_MD) -> frozenset[str]:
    """The mutants tests/MUTATION.md lists as equivalent (lines starting with ``- `funcgrad....```)."""
    if not path.exists():
        return frozenset()
    return frozenset({line.split("`")[1] for line in path.read_text().splitlines() if line.startswith("- `funcgrad.")})


def _tests_for(name: str, root: Path) -> list[str]:
    """The module's own test files and the pinned ones."""
    module = _module(name).split(".")[-1].lstrip("_")
    return sorted(str(p.relative_to(root)) for p in (root / "tests").glob("test_*.py")
                  if module in p.stem or p.stem.startswith("test_pinned_"))


def recheck(name: str | None, tests: list[str] | None = None, root: Path = Path("mutants")) -> str:
    """``killed`` or ``survived``: mutant ``name`` against whole test files (see the module docstring); with
    ``name`` None, the control run with no mutant (which must say ``survived``)."""
    tests = tests or _tests_for(name or "", root)
    env = {**os.environ, "FUNCGRAD_COMPILATION_CACHE": "0"}
    env.pop("MUTANT_UNDER_TEST", None)
    if name is not None:
        env["MUTANT_UNDER_TEST"] = name
    proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
                           "-m", "not slow", *tests], cwd=root, env=env, capture_output=True, text=True, check=False)
    return {0: "survived", 1: "killed"}.get(proc.returncode, f"error {proc.returncode}: {proc.stdout[-500:]}")


def _recheck_main(args: list[str], root: Path = Path("mutants")) -> int:
    """Copies tests/ into the mutants' tree (edited tests count), runs the control, then each mutant."""
    names, tests = (args[: args.index("--")], args[args.index("--") + 1 :]) if "--" in args else (args, [])
    shutil.copytree("tests", root / "tests", dirs_exist_ok=True)
    for files in {tuple(tests or _tests_for(n, root)) for n in names}:
        control = recheck(None, list(files), root)
        if control != "survived":
            print(f"control run without a mutant failed on {list(files)}: {control}")
            return 1
    for name in names:
        print(name, recheck(name, tests or None, root), flush=True)
    return 0


if __name__ == "__main__":
    if "--recheck" in sys.argv:
        sys.exit(_recheck_main(sys.argv[sys.argv.index("--recheck") + 1 :]))
    if not Path("mutants").is_dir():
        sys.exit("no mutants/ folder: run `mutmut run` once first (make mutate) to generate the mutants")
    seed = int(sys.argv[sys.argv.index("--seed") + 1]) if "--seed" in sys.argv else 0
    # --exclude K: none of the seed-0 sample of K per module (a fresh sample after tests were written for that one)
    excluded = frozenset(sample(int(sys.argv[sys.argv.index("--exclude") + 1]))) if "--exclude" in sys.argv else frozenset()
    picked = sample(int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 20, seed, exclude=excluded)
    print(report(picked, _equivalent()) if "--report" in sys.argv else "\n".join(picked))
