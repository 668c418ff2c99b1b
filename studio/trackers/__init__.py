"""Experiment trackers (TensorBoard, MLflow): a run's metrics and config copied into the tracker
a team uses. The studio's own history stays the source of truth; the tracker is a copy."""
