from glob import glob

from setuptools import find_packages, setup

setup(
    name="s3repofs",
    version="0.1.0",
    description="An S3 bucket and a SQL database as a distributed file repository, mountable with FUSE",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["s3repofs", "s3repofs.*"]),
    install_requires=[
        "boto3>=1.28,<2",
        "psycopg2-binary>=2.9,<3",
        "cachetools>=5.3,<9",
        # XXH3-128 verifies downloads at ~11 GB/s; md5 (0.8 GB/s here) would bound every cold read.
        "xxhash>=3.0,<5",
        # mfusepy: the maintained continuation of fusepy (same high-level API, libfuse 2 and 3).
        "mfusepy>=3.0,<4",
        # tenacity: the attempt loop of the one S3 retry policy (s3repofs/objects/retry.py), so a download's
        # retries are a stop, a wait and a predicate, not a hand-written loop.
        "tenacity>=8,<10",
        # tqdm: the progress bar of gc, backup, restore, fsck and rebuild on a terminal (ops/progress.py);
        # the field's standard, with rate and time left, rather than a bar drawn by hand.
        "tqdm>=4.66,<5",
        # prometheus_client: the mount's metrics (s3repofs/metrics.py) in the format Prometheus and node_exporter
        # read, with its registry, histograms, HTTP endpoint and textfile writer rather than our own.
        "prometheus_client>=0.20,<1",
    ],
    extras_require={
        # hypothesis: the reference-model test (tests/test_model.py) drives random operation sequences.
        # pytest-xdist: ./scripts/test runs the suite in several processes; its tests mostly wait (on
        # servers, mounts, subprocesses), not on the CPU, so it takes a fraction of the time on 2 cores.
        "test": ["pytest>=7,<10", "moto[server]>=5,<6", "hypothesis>=6.100,<7", "pytest-xdist>=3.5,<4"],
    },
    entry_points={"console_scripts": [
        "s3repofs=s3repofs.cli:main",
        # The helper mount(8) runs for -t fuse.s3repofs and fstab lines (scripts/setup links it into /sbin).
        "mount.fuse.s3repofs=s3repofs.cli.mounthelper:main",
    ]},
    # The systemd units, one copy: `s3repofs systemd install` reads them from the checkout, else from here.
    data_files=[("share/s3repofs/systemd", sorted(glob("systemd/*")))],
)
