"""sr3d: two-stage CNN super-resolution of CT and MRI volumes (TensorFlow 2 / Keras 3)."""
import setuptools

setuptools.setup(
    name="sr3d",
    version="0.1.0",
    description="3D super-resolution of CT and MRI scans with the two-stage CNN of "
    "Georgescu, Ionescu and Verga (IEEE Access 2020).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["sr3d", "sr3d.*"]),
    package_data={"sr3d": ["data_files/*", "data_files/**/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        "tensorflow-cpu>=2.16",
        "tensorboard",
        "numpy",
        "scipy",
        "nibabel>=5",
        "pydicom>=3",
        # pydicom decodes compressed transfer syntaxes only through plugins.
        "pylibjpeg>=2",
        "pylibjpeg-openjpeg",
        "pynrrd",
        "opencv-python-headless",
        "absl-py",
        "pyrtools>=1.0",
        "matplotlib",
    ],
    extras_require={
        # playwright drives Debian's chromium in tests/test_study.py (its own browsers are never downloaded).
        # SimpleITK and dcm2niix re-read the DICOM series sr3d writes (tests/test_dicom_out.py).
        "test": ["pytest", "scikit-image", "playwright", "SimpleITK", "dcm2niix"],
    },
    entry_points={"console_scripts": ["sr3d=sr3d.cli:main"]},
)
