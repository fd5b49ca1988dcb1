"""Reading the RSNA 2022 cervical-spine dataset, synthetic studies, and YOLO dataset preparation."""

import logging

logger = logging.getLogger("data_prep")
