"""``pyraflow bench``: the standard bench setting, the layouts compared against (baselines), the speed and memory
figures, and the quality-at-equal-compute study."""
