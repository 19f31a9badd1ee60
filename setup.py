"""Install twicing-lm: packages core, data_prep, launch, lm and the `lm` console script.

torch is required but not pinned here: a machine that already has a (CUDA) torch keeps it.
scripts/bootstrap.sh installs a CPU torch first on machines without one.
"""

from setuptools import find_packages, setup

setup(
    name="twicing-lm",
    version="0.1.0",
    description="GPT training stack with twicing attention, DeepSpeed ZeRO and tensor parallelism",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["core", "lm", "lm.*", "data_prep", "data_prep.*", "launch", "launch.*"]),
    package_data={"lm": ["../configs/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "sentencepiece>=0.2",
        "datasets>=2.19",
        "numpy>=1.24",
        "tensorboard>=2.14",
        "pyyaml>=6",
        "safetensors>=0.4",
        "tqdm>=4.66",
        "matplotlib>=3.7",
        "python-hostlist>=1.23",
        "psutil>=5.9",  # launch.processes (DeepSpeed needs it too)
    ],
    extras_require={
        "mpi": ["mpi4py>=3.1"],
        "wandb": ["wandb>=0.17"],  # train.wandb
        "eval": ["lm-eval>=0.4.13,<0.5"],  # lm harness
        # wandb: its offline mode is tested; accelerate: lm-eval's own HF backend, which the harness
        # tests check ours against; scipy: compare_paper_lm.py's Welch t-test (without it, a plain
        # two-standard-error rule)
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "transformers>=4.40",
            "ruff>=0.8",
            "wandb>=0.17",
            "accelerate>=0.26",
            "scipy>=1.9",
        ],
    },
    entry_points={"console_scripts": ["lm = lm.cli:main"]},
)
