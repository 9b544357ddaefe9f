"""sr3d: two-stage CNN super-resolution of CT and MRI volumes (TensorFlow 2 / Keras 3)."""
import setuptools

# Tested up to TensorFlow 2.21.0 and Keras 3.15.1 (README, "Install"); users of similar tools report
# breakage on new TensorFlow releases, so the upper bounds move only after the tests pass on one.
_TF = ">=2.16,<2.22"
# tensorflow-cpu has wheels only for x86-64 Linux and Windows; elsewhere (macOS, aarch64 Linux)
# the plain tensorflow wheel is the CPU build. The two markers are exact complements (PEP 508 has no `not`).
_X86_64_LINUX_OR_WINDOWS = ('(platform_system == "Linux" or platform_system == "Windows") and '
                            '(platform_machine == "x86_64" or platform_machine == "AMD64")')
_ONNX = ["tf2onnx>=1.17,<1.18", "onnxruntime"]
# Beam 2.77 pins protobuf < 7 (pip then installs 6.33.x, which TensorFlow 2.21 imports fine).
_BEAM = "apache-beam>=2.60,<2.78"
_ANY_OTHER_PLATFORM = ('(platform_system != "Linux" and platform_system != "Windows") or '
                       '(platform_machine != "x86_64" and platform_machine != "AMD64")')

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
        f"tensorflow-cpu{_TF}; {_X86_64_LINUX_OR_WINDOWS}",
        f"tensorflow{_TF}; {_ANY_OTHER_PLATFORM}",
        "keras>=3.0,<3.16",
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
        # SimpleITK and dcm2niix re-read the DICOM series sr3d writes (tests/test_dicom_out.py);
        # the onnx extra is tested by tests/test_onnx_export.py.
        # apache-beam too: tests/test_beam.py runs the upscale-beam pipeline on the DirectRunner in CI.
        "test": ["pytest", "scikit-image", "playwright", "SimpleITK", "dcm2niix", *_ONNX, _BEAM],
        # export.py --format onnx (sr3d/onnx_export.py); tested with tf2onnx 1.17.0, onnxruntime 1.32.0.
        "onnx": _ONNX,
        # sr3d upscale-beam (sr3d/beam.py); tested with apache-beam 2.77.0 (tests/test_beam.py).
        "beam": [_BEAM],
        # CUDA GPUs on Linux. pip cannot swap tensorflow-cpu for it, so on x86-64 both end up installed
        # (one `tensorflow` module): README, "Install", says how to keep only the GPU build.
        "gpu": [f"tensorflow[and-cuda]{_TF}; platform_system == \"Linux\""],
    },
    entry_points={"console_scripts": ["sr3d=sr3d.cli:main"]},
)
