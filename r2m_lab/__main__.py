"""``python -m r2m_lab [overrides]``: the Hydra entry point. Everything else is in :mod:`r2m_lab.stages`."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from r2m_lab.memory import reuse_freed_memory
    from r2m_lab.stages import run_stage  # imported here so `--help` and config errors answer fast

    reuse_freed_memory()  # large merges reuse freed memory instead of page-faulting it in again (see memory.py)
    run_stage(cfg)


if __name__ == "__main__":
    main()
