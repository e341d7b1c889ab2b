"""inference layer: standard errors (robust, cluster), tests against other models."""
