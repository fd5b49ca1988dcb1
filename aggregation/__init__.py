"""Study-level aggregation: features from boxes and levels, gradient boosting, the metric, submissions."""

import logging

logger = logging.getLogger("aggregation")
