"""environment.yml (GPU clusters) must ask for the same packages as pyproject.toml."""
import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].lower()


def test_environment_pip_part_matches_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    env_reqs = {_name(r): r.replace(" ", "") for r in pip if not r.startswith("-")}
    wanted = [r for r in project["dependencies"] if _name(r) != "torch"] + project["optional-dependencies"]["cluster"]
    for req in wanted:
        assert _name(req) in env_reqs, f"environment.yml lacks {req}"
        env_req = env_reqs[_name(req)]
        if env_req != req.replace(" ", ""):   # else only an exact pin inside pyproject's range (a build for one torch)
            pin = re.fullmatch(r"[\w.-]+==([\w.]+)", env_req)
            assert pin and pin.group(1) in Requirement(req).specifier, f"{env_req} != {req}"
    assert "-e ." in pip


def test_environment_torch_is_admitted_by_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    torch_req = next(r for r in project["dependencies"] if _name(r) == "torch")
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    conda_torch = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("pytorch="))
    major_minor = tuple(int(x) for x in conda_torch.split("=")[1].split(".")[:2])
    lo = tuple(int(x) for x in re.search(r">=([\d.]+)", torch_req).group(1).split(".")[:2])
    hi = tuple(int(x) for x in re.search(r"<([\d.]+)", torch_req).group(1).split(".")[:2])
    assert lo <= major_minor < hi
    assert lo <= (2, 13) < hi, "the local CPU wheel torch==2.13.0 must stay admitted"
