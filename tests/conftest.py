"""Shared fixtures: real sample photos (scikit-image ships them) written as files."""
import os
import shutil
import tempfile

import pytest

# Never reach for the hub in tests: an uncached pretrained tag must fail fast and clearly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    """Paths of four real photos, as JPEG and PNG files."""
    from PIL import Image
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for name, ext in [("astronaut", "jpg"), ("coffee", "png"), ("chelsea", "jpg"), ("rocket", "png")]:
        path = folder / f"{name}.{ext}"
        Image.fromarray(getattr(data, name)()).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="session")
def photos(images) -> list[bytes]:
    """12 distinct JPEGs (quality 90): the 4 sample photos, each also cropped two ways."""
    import io

    from PIL import Image

    out = []
    for path in images:
        image = Image.open(path).convert("RGB")
        w, h = image.size
        for box in [(0, 0, w, h), (0, 0, w * 3 // 4, h * 3 // 4), (w // 4, h // 4, w, h)]:
            buffer = io.BytesIO()
            image.crop(box).save(buffer, format="JPEG", quality=90)
            out.append(buffer.getvalue())
    return out


@pytest.fixture(scope="session")
def tiny_coca():
    """coca-tiny with random weights from seed 0: the in-process reference of the export and Triton tests."""
    import coca

    return coca.load("coca-tiny", pretrained="random", seed=0)


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory):
    """That model exported once for the session as a Triton model repository: (path, logit scale).

    The old export paths (torch encoders, the step protocol only), not the defaults: the service tests on it fill
    coca_text_decoder's cache and read its stats (tests/test_search_service.py's DecoderFull); the defaults'
    paths are tested in tests/test_triton.py, tests/test_triton_pool.py and tests/test_clients.py."""
    from serving.repository import EncoderSettings, ensure_repository

    return ensure_repository(tmp_path_factory.mktemp("tiny-repository") / "repo", "coca-tiny", "random", 0,
                             encoders=EncoderSettings("torch"), decoder_scheduler="sequence")


@pytest.fixture(scope="session")
def shared_triton(tiny_repository):
    """One tritonserver serving `tiny_repository` for every module that needs a plain one (each start costs
    15-30 s of a 2-core CI box). It keeps its ports, so a test may stop it and start it again; `plain_triton`
    hands it out alive. Modules that kill, hang or reconfigure Triton start their own."""
    from serving.testing import restartable_triton, triton_unavailable_reason

    reason = triton_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with restartable_triton(tiny_repository[0]) as server:
        yield server


@pytest.fixture(scope="module")
def plain_triton(shared_triton):
    """The shared tritonserver, started again if an earlier module left it down."""
    return shared_triton.ensure_running()


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    """A real Milvus standalone for the whole test session, on ports of its own (its embedded etcd's too): it
    runs beside any other Milvus on the host (see MilvusServerProcess)."""
    from search_service.testing import MilvusServerProcess

    server = MilvusServerProcess(tmp_path_factory.mktemp("milvus"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------- headless Chromium (web gallery tests)
def browser_unavailable_reason() -> str | None:
    for tool in ("chromium", "chromedriver"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: apt-get install chromium chromium-driver; scripts/bootstrap.sh does as root)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


@pytest.fixture
def browser(tmp_path):
    reason = browser_unavailable_reason()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1000", f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        yield driver
    finally:
        driver.quit()


# ---------------------------------------------------------------- the untimed lane's timeout
UNTIMED_TIMEOUT_S = 1800  # make test-reliability runs `untimed` tests at nice 10 beside the timed lane: the
# 10,000 fuzz cases (272 s at load 8 alone) ran past pyproject's 600 s there, with nothing wrong but the wait


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("untimed") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(UNTIMED_TIMEOUT_S))
