"""Run Ultralytics (and OpenVINO) fully offline, quiet, writing only under a folder the project owns.

Call `configure_ultralytics()` before anything imports `ultralytics`: its settings folder, its settings file
and matplotlib's cache are fixed at import time. What it does, and why (ultralytics 8.4):
- `YOLO_OFFLINE=1`: `ultralytics.utils.is_online()` returns False without a DNS lookup, so update checks,
  analytics events and hub calls are skipped.
- `YOLO_AUTOINSTALL=0`: `check_requirements` never runs pip; a missing package is an error instead.
- `YOLO_CONFIG_DIR` and `MPLCONFIGDIR` under the project folder: otherwise both write under $HOME, and the
  first settings file pins `datasets_dir` to whatever folder was current.
- `Arial.ttf` / `Arial.Unicode.ttf` in the Ultralytics settings folder, copied from matplotlib's bundled
  DejaVuSans.ttf: `check_font` finds them there instead of downloading them on every train()/val().
- `CI=true`: openvino-telemetry declines to send anything (`OptInChecker.check(disable_in_ci=True)`) and
  does not create its consent file under $HOME.
- settings `sync=False` and every logger integration off; `YOLO_VERBOSE=False` unless the user set it
  (no banners and no Ultralytics progress bars; `set_ultralytics_verbosity(True)` brings its INFO log back).
Ultralytics also sets `OMP_NUM_THREADS=1` on import and `torch.set_num_threads(cpu_count - 1)` whenever it
selects a device; `restore_threads` undoes that (1.6-1.9x faster on 2 cores, see shared/MEASURED.md).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

log = logging.getLogger("detector")

HOME_ENV = "SPINEFRAC_HOME"
DEFAULT_HOME = Path("~/.cache/spinefrac")
ULTRALYTICS_SUBDIR = "ultralytics"  # $YOLO_CONFIG_DIR; Ultralytics appends "Ultralytics" itself
ULTRALYTICS_APP_DIR = "Ultralytics"
MATPLOTLIB_SUBDIR = "matplotlib"
FONT_NAMES = ("Arial.ttf", "Arial.Unicode.ttf")  # the names ultralytics.utils.checks.check_font asks for
SOURCE_FONT = "DejaVuSans.ttf"  # bundled with matplotlib

# Ultralytics settings that would otherwise reach a service or write outside the project folder.
_OFF_SETTINGS = ("sync", "clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb",
                 "vscode_msg", "openvino_msg")

OFFLINE_ENV = {
    "YOLO_OFFLINE": "1",
    "YOLO_AUTOINSTALL": "0",
    "CI": "true",  # openvino-telemetry: declined in CI, nothing sent, no consent file under $HOME
}

_configured_home: Path | None = None


def project_home(home: Path | None = None) -> Path:
    """Return the folder the project owns for caches: `home`, else $SPINEFRAC_HOME, else ~/.cache/spinefrac."""
    if home is None:
        home = Path(os.environ.get(HOME_ENV) or DEFAULT_HOME)
    return Path(home).expanduser().resolve()


def configure_ultralytics(home: Path | None = None) -> None:
    """Make Ultralytics, matplotlib and OpenVINO run offline and keep their files under the project folder."""
    global _configured_home
    home = project_home(home)
    if _configured_home == home:
        return
    config_dir = home / ULTRALYTICS_SUBDIR
    mpl_dir = home / MATPLOTLIB_SUBDIR
    os.environ.update(OFFLINE_ENV)
    os.environ.setdefault("YOLO_VERBOSE", "False")  # no banners on import; set_ultralytics_verbosity(True) for -v
    if "ultralytics" in sys.modules:
        from ultralytics.utils import USER_CONFIG_DIR

        active = Path(USER_CONFIG_DIR)
        if active != config_dir / ULTRALYTICS_APP_DIR:
            # Imported earlier (elsewhere, or configured with another home): its folders are fixed for this
            # process. Leave them and the new home alone, but make sure train()/val() never fetch a font.
            level = logging.WARNING if _configured_home is None else logging.DEBUG
            log.log(level, "ultralytics was imported before configure_ultralytics(%s); it keeps its settings "
                           "in %s", home, active)
            _install_fonts(active)
            _configured_home = home
            return
    for folder in (config_dir / ULTRALYTICS_APP_DIR, mpl_dir):
        folder.mkdir(parents=True, exist_ok=True)
    os.environ.update({"YOLO_CONFIG_DIR": str(config_dir), "MPLCONFIGDIR": str(mpl_dir)})
    _install_fonts(config_dir / ULTRALYTICS_APP_DIR)

    # The first import of ultralytics reads the environment set above.
    from ultralytics.utils import SETTINGS, USER_CONFIG_DIR

    updates = {key: False for key in _OFF_SETTINGS if SETTINGS.get(key) is not False}
    for key, sub in (("datasets_dir", "datasets"), ("weights_dir", "weights"), ("runs_dir", "runs")):
        if SETTINGS.get(key) != str(home / sub):
            updates[key] = str(home / sub)
    if updates:
        SETTINGS.update(updates)
    _configured_home = home
    log.debug("ultralytics configured offline; settings in %s", USER_CONFIG_DIR)


def _install_fonts(folder: Path) -> None:
    """Copy matplotlib's DejaVuSans.ttf to the font names Ultralytics would otherwise download."""
    missing = [folder / name for name in FONT_NAMES if not (folder / name).is_file()]
    if not missing:
        return
    import matplotlib

    source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / SOURCE_FONT
    folder.mkdir(parents=True, exist_ok=True)
    for target in missing:
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)


def resolve_threads(threads: int | None) -> int:
    """Return the CPU thread count to use: `threads`, or every core when it is None or 0."""
    return int(threads) if threads else (os.cpu_count() or 1)


def restore_threads(threads: int | None = None) -> int:
    """Set torch's intra-op CPU threads (Ultralytics lowers them to cpu_count - 1); return the count set."""
    import torch

    n = resolve_threads(threads)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def set_ultralytics_verbosity(verbose: bool) -> None:
    """Show Ultralytics' own INFO messages only when `verbose`; its warnings always get through."""
    level = logging.INFO if verbose else logging.WARNING
    logger = logging.getLogger("ultralytics")
    logger.setLevel(level)
    for handler in logger.handlers:  # Ultralytics sets its stdout handler to ERROR when YOLO_VERBOSE is off
        handler.setLevel(level)
