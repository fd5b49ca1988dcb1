"""The built wheel works outside the checkout: its configs, templates and everything `spinefrac` needs are inside.

The wheel is built from this checkout (`python -m build --wheel --no-isolation`: the build tools of this
environment, nothing downloaded) and installed without dependencies into a new virtual environment in a
temporary folder. That environment sees the heavy dependencies (torch, Ultralytics, ...) through one path line
appended to its `sys.path` (a `.pth` file naming this environment's site-packages, whose own `.pth` files, among
them the editable install of this checkout, are not processed), so `import spinefrac` can only find the wheel's
copy. Commands run from the temporary folder with no PYTHONPATH: the source tree is nowhere on the path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set=image.size=96", "--set=volume.slices=40", "--set=labels.box_fraction=1.0",
        "--set=labels.segmentation_fraction=0.5"]
TINY_PIPELINE = (
    'detector:\n  set: ["train.epochs=1", "render.imgsz=64", "train.plots=false", "train.val=false"]\n'
    'locator:\n  enabled: false\n'
    'classifier:\n  enabled: false\n'
    'aggregation:\n  set: ["splits.n_folds=2"]\n')
"""A training run of a minute: the test checks that the packaged files are found, not what is learnt."""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A new virtual environment holding only the wheel built from this checkout; returns its bin folder."""
    pytest.importorskip("build")
    root = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(root / "dist"),
                            str(ROOT)], capture_output=True, text=True, cwd=root)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    wheel = next((root / "dist").glob("spinefrac-*.whl"))
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / "bin"
    site = Path(subprocess.run([str(bin_dir / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True, env=_clean_env()).stdout.strip())
    pip = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
                          str(wheel)], capture_output=True, text=True, env=_clean_env())
    assert pip.returncode == 0, pip.stdout + pip.stderr
    # only now: with this environment's site-packages visible, pip would take the editable install as the wheel
    (site / "spinefrac_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return root, bin_dir


def _clean_env() -> dict[str, str]:
    """This process's environment without anything that would put the checkout on the path."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def _run(installed, *args: str) -> subprocess.CompletedProcess:
    root, bin_dir = installed
    env = _clean_env()
    env.update(SPINEFRAC_HOME=str(root / "home"), YOLO_OFFLINE="1", PATH=f"{bin_dir}:{env.get('PATH', '')}")
    return subprocess.run([str(bin_dir / "spinefrac"), *args], capture_output=True, text=True, cwd=root, env=env)


@pytest.mark.slow
def test_wheel_imports_its_own_copy_with_configs_and_templates(installed):
    root, bin_dir = installed
    probe = ("import json, spinefrac, data_prep, configs, spinefrac.report as r; from pathlib import Path; "
             "print(json.dumps([spinefrac.__file__, data_prep.__file__, sorted(p.name for p in "
             "Path(configs.__file__).parent.glob('*.yaml')), sorted(p.name for p in "
             "(Path(r.__file__).parent / 'templates').glob('*.j2'))]))")
    out = subprocess.run([str(bin_dir / "python"), "-c", probe], capture_output=True, text=True, cwd=root,
                         env=_clean_env())
    assert out.returncode == 0, out.stderr
    spinefrac_file, data_prep_file, yamls, templates = json.loads(out.stdout)
    for path in (spinefrac_file, data_prep_file):
        assert Path(path).is_relative_to(root / "venv"), path        # the wheel's copy, not the checkout
    assert {"detector.yaml", "locator.yaml", "levels.yaml", "aggregation.yaml", "classifier.yaml", "pipeline.yaml",
            "synth.yaml", "serve.yaml"} <= set(yamls)
    assert templates, "the report's templates are in the wheel"
    version = _run(installed, "--version")
    assert version.returncode == 0 and version.stdout.startswith("spinefrac ")


@pytest.mark.slow
def test_wheel_synthesises_inspects_trains_and_predicts(installed):
    root, _ = installed
    assert _run(installed, "synth", "data", "--studies", "12", "--seed", "3", "--no-progress", *TINY).returncode == 0
    assert _run(installed, "synth", "test", "--studies", "2", "--seed", "4", "--split", "test", "--no-progress",
                *TINY).returncode == 0
    inspected = _run(installed, "inspect", "data/train_images", "--no-progress")
    assert inspected.returncode == 0, inspected.stdout + inspected.stderr
    (root / "pipeline.yaml").write_text(TINY_PIPELINE)
    trained = _run(installed, "train", "data", "--out", "model", "--config", "pipeline.yaml", "--no-progress")
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    predicted = _run(installed, "predict", "test/test_images", "--model", "model", "--out", "pred", "--no-progress")
    assert predicted.returncode == 0, predicted.stdout[-3000:] + predicted.stderr[-3000:]
    assert (root / "pred" / "predictions.csv").is_file()
    assert (root / "pred" / "report" / "index.html").is_file()      # rendered from the packaged templates
