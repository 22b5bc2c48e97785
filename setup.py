from setuptools import find_packages, setup

setup(
    name="megatron-pref",
    version="0.1.0",
    description="Preference optimisation (DPO family, SPO, SLIME) at pretraining scale on megatron-core",
    packages=find_packages(include=["megatron_pref", "megatron_pref.*"]),
    package_data={"megatron_pref": ["assets/demo/*"]},
    python_requires=">=3.10",
    install_requires=[
        "megatron-core==0.16.1",
        "torch>=2.6",
        "numpy",
        "psutil",  # dist_checkpointing's async writer needs it
        "tqdm",
        "sentencepiece",
        "tokenizers",
        "safetensors",
        "pyarrow",
        "transformers",
        "xxhash",  # content identity of data files (megatron_pref/data/fingerprint.py)
    ],
    extras_require={
        "logging": ["tensorboard", "wandb"],
        # megatron-core 0.16.1 is tested with TE 2.9 - 2.11.
        "gpu": ["transformer-engine[pytorch]>=2.9,<2.12"],
        # trl: tests/test_losses_trl.py checks every loss against TRL's own DPOTrainer code
        # (about 30 s more to install, with accelerate and datasets).
        "test": ["pytest", "pyyaml", "trl==1.16.0", "matplotlib"],
        # tools/loss_study.py's plots (without it, a small PIL renderer draws them).
        "study": ["matplotlib"],
    },
)
