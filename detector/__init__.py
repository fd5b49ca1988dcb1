"""The YOLO fracture detector and vertebra locator: training, batch detection, export, overlays."""

import logging

logger = logging.getLogger("detector")
