"""keras-stg: strong lottery tickets with stochastic gates for Keras 3."""

from setuptools import find_packages, setup

# Ranges are the ones tested on the project machines (Python 3.11, CPU).
setup(
    name="keras-stg",
    version="0.2.0",
    description="Strong lottery tickets with continuously relaxed Bernoulli gates for Keras 3",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["keras_stg", "keras_stg.*", "export", "export.*"]),
    # The fused CPU gate kernels are compiled from this source on first use.
    package_data={"keras_stg": ["_ops/*.cc"]},
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "keras>=3.15,<3.16",
        "numpy>=2.0,<2.5",
        "pyyaml>=6.0,<7",
        "matplotlib>=3.8,<3.12",
        "tensorboard>=2.21,<2.22",
    ],
    extras_require={
        "hub": ["keras-hub>=0.32,<0.33"],
        "export": [
            "ai-edge-litert>=2.3,<2.4",
            "tf2onnx>=1.17,<1.18",
            "onnx>=1.17,<1.24",
            "onnxruntime>=1.31,<1.32",
        ],
        "data": ["tensorflow-datasets>=4.9,<4.10"],
        "test": [
            "pytest>=8,<10",
            "keras-hub>=0.32,<0.33",
            "ai-edge-litert>=2.3,<2.4",
            "tf2onnx>=1.17,<1.18",
            "onnx>=1.17,<1.24",
            "onnxruntime>=1.31,<1.32",
            # benchmarks.run --quick runs tfmot in its own process.
            "tf_keras>=2.21,<2.22",
            "tensorflow-model-optimization>=0.8.1,<0.9",
        ],
    },
)
