import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

# Installed beside the package: Python runs it at start, and `_diffusers_magi_hook` lets
# `DiffusionPipeline.from_pretrained` find the MAGI-1 classes without `import diffusers_magi` (see that module).
STARTUP_FILE, STARTUP_LINE = "diffusers_magi.pth", "import _diffusers_magi_hook\n"


def write_startup_file(folder):
    with open(os.path.join(folder, STARTUP_FILE), "w") as file:
        file.write(STARTUP_LINE)


class BuildPyWithStartupFile(build_py):
    """Regular installs: the startup file goes to the top of the wheel (site-packages)."""

    def run(self):
        super().run()
        write_startup_file(self.build_lib)


class EditableWheelWithStartupFile(editable_wheel):
    """`pip install -e`: setuptools builds the editable wheel without build_py's outputs, so the startup file is added
    to the wheel's top folder here (the step that fills it with the project's own .pth files)."""

    def _install_namespaces(self, installation_dir, pth_prefix):
        super()._install_namespaces(installation_dir, pth_prefix)
        write_startup_file(installation_dir)


setup(
    name="diffusers-magi",
    version="0.1.0.dev0",
    description="MAGI-1 autoregressive video generation as native Hugging Face Diffusers components",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    package_dir={"": "src"},
    packages=find_packages("src"),
    py_modules=["_diffusers_magi_hook"],
    cmdclass={"build_py": BuildPyWithStartupFile, "editable_wheel": EditableWheelWithStartupFile},
    python_requires=">=3.10",
    # torch is deliberately unpinned here: install the build you want first (see README); a range that the
    # installed torch satisfies makes pip leave it alone.
    install_requires=[
        "torch>=2.5",
        "diffusers>=0.42.1",
        "transformers>=5.0",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "huggingface_hub>=0.34",
        "imageio>=2.30",
        "imageio-ffmpeg>=0.5",
        "numpy",
        # prompt cleaning exactly as MAGI-1's T5 embedder does it
        "ftfy",
        "beautifulsoup4",
    ],
    entry_points={
        "console_scripts": [
            "magi-generate=diffusers_magi.cli:main",
            "magi-convert=diffusers_magi.conversion.cli:main",
            "magi-train-lora=diffusers_magi.training.train_lora:main",
            "magi-app=diffusers_magi.app:main",
        ]
    },
    extras_require={
        # zstandard, sentencepiece, protobuf: the conversion tests read .zst shards and an original-style T5 tokenizer
        # nbclient/nbformat/ipykernel: the tests execute the example notebook
        # torchao: the quantization tests (a 3 MB wheel that leaves torch alone)
        # peft: the LoRA and training tests
        # gradio, gradio_client, playwright: the web app tests (playwright drives the system chromium, downloads none)
        "test": [
            "pytest>=8",
            "hypothesis>=6",
            "zstandard>=0.22",
            "sentencepiece>=0.2",
            "protobuf",
            "nbclient",
            "nbformat",
            "ipykernel",
            "torchao>=0.18",
            "peft>=0.17",
            "gradio>=5.0",
            "gradio_client",
            "playwright",
        ],
        # magi-app, the web app (Gradio)
        "app": ["gradio>=5.0"],
        # LoRA adapters (`load_lora_weights`) and `magi-train-lora`
        "lora": ["peft>=0.17"],
        "training": ["peft>=0.17"],
        # weight-only int8 / float8 quantisation of the transformer (`TorchAoConfig`)
        "torchao": ["torchao>=0.18"],
        # magi-convert: .zst-compressed original shards; the original T5 tokenizer (spiece.model)
        "convert": ["zstandard>=0.22", "sentencepiece>=0.2", "protobuf"],
        "zstd": ["zstandard>=0.22"],
        "xformers": ["xformers"],
    },
    classifiers=[
        "License :: OSI Approved :: Apache Software License",
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
