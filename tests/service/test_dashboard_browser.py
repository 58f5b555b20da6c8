"""The dashboard in a real browser (Debian's Chromium, headless, through Selenium and chromedriver) against a live
server with its broker, a build worker and emulated devices: sign in, upload a model, request a build and watch it
finish without reloading, the search's Pareto chart, a rollout to devices watched stage by stage, a viewer refused,
sign out. TINYMLAAS_SCREENSHOTS=DIR keeps a screenshot of each page there (docs/dashboard/ holds the last ones)."""

import json
import os
import shutil
from pathlib import Path

import pytest

from server.client import Client
from server.db import Organization
from server.services.tenants import create_user, principal_for_token
from tests.helpers import quantized_layers as q
from tests.helpers.fleet import start_agents, start_server

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="Chromium and chromedriver are not installed (make setup installs them)")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("dashboard")
    server = start_server(root / "data")
    yield {"server": server, "root": root}
    server.stop()


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1400"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.implicitly_wait(2)
    yield driver
    driver.quit()


def shot(browser, name: str) -> None:
    folder = os.environ.get("TINYMLAAS_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(Path(folder) / f"{name}.png"))


def until(browser, what: str, cond, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, timeout, poll_frequency=0.25).until(lambda _d: cond(), message=f"waiting for {what}")


def sign_in(browser, url: str, token: str) -> None:
    from selenium.webdriver.common.by import By

    browser.get(url + "/ui/login")
    assert browser.find_element(By.CSS_SELECTOR, "#login-form input[name=csrf_token]").get_attribute("value")
    browser.find_element(By.ID, "token").send_keys(token)
    browser.find_element(By.ID, "sign-in").click()


def text(browser, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return browser.find_element(By.ID, element_id).text


def test_the_dashboard_from_sign_in_to_a_rollout(live, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    server, url = live["server"], live["server"].url
    sign_in(browser, url, server.admin_token)
    until(browser, "the fleet page", lambda: browser.current_url.endswith("/ui/fleet"))
    assert "0 of 0 devices" in browser.find_element(By.TAG_NAME, "h1").text

    # upload a model, request a build, watch it finish
    model = tmp_path / "dense.tflite"
    model.write_bytes(q.fully_connected(3, [1, 48], 10, 1))
    browser.find_element(By.ID, "nav-models").click()
    browser.find_element(By.ID, "model-file").send_keys(str(model))
    browser.find_element(By.ID, "upload").click()
    until(browser, "the model page", lambda: text(browser, "model-name") == "dense")
    shot(browser, "model")
    Select(browser.find_element(By.ID, "target")).select_by_value("cortex-m4")
    browser.find_element(By.ID, "budget").send_keys("3")
    browser.find_element(By.ID, "request-build").click()
    until(browser, "the build page", lambda: "/ui/builds/" in browser.current_url)
    page = browser.current_url
    build_id = int(page.rsplit("/", 1)[1])
    states = set()
    until(browser, "the build to finish", lambda: states.add(text(browser, "build-state")) or
          bool(browser.find_elements(By.ID, "report")), timeout=300)
    assert browser.current_url == page  # progress came in without navigating
    assert "done" in text(browser, "build-state")
    assert int(text(browser, "report-instructions").replace(",", "")) > 0
    assert "bit-exact" in text(browser, "report-verified")
    assert "ms at" in text(browser, "report-latency")

    # the search's Pareto front: a point per variant, hover shows it, click picks it
    points = browser.find_elements(By.CSS_SELECTOR, "#front-chart circle.front-point")
    assert len(points) >= 2
    other = next(p for p in points if "(chosen)" not in p.find_element(By.TAG_NAME, "title").get_attribute("textContent"))
    ActionChains(browser).move_to_element(other).perform()
    until(browser, "the hover text", lambda: "instructions" in text(browser, "front-tip"))
    other.click()
    assert "picked:" in text(browser, "front-picked") and '"kernels"' in text(browser, "front-picked")
    index = int(other.get_attribute("data-index"))
    shot(browser, "build")

    # the picked point built as its own build: exactly its variant
    browser.find_element(By.ID, "build-picked").click()
    until(browser, "the picked point's build", lambda: browser.current_url != page and "/ui/builds/" in browser.current_url)
    until(browser, "it to finish", lambda: bool(browser.find_elements(By.ID, "report")), timeout=300)
    client = Client(url, server.admin_token)
    built = client.build(int(browser.current_url.rsplit("/", 1)[1]))
    front = json.loads(client.download_artifact(build_id, "front", tmp_path / "front.json").read_text())
    assert built["state"] == "done" and built["report"]["verified"]
    assert built["report"]["variant"] == front["points"][index]["variant"]
    browser.get(page)

    # devices, a rollout to them, stage by stage
    agents = start_agents(server, live["root"], ["ui-dev-1", "ui-dev-2"], group="ui")
    try:
        browser.find_element(By.ID, "nav-fleet").click()
        until(browser, "both devices listed", lambda: len(browser.find_elements(By.CSS_SELECTOR, "a.device-name")) == 2)
        Select(browser.find_element(By.ID, "filter-group")).select_by_value("ui")
        until(browser, "the filtered list", lambda: "group=ui" in browser.current_url)
        browser.find_element(By.ID, "nav-rollouts").click()
        Select(browser.find_element(By.ID, "rollout-build")).select_by_value(str(build_id))
        Select(browser.find_element(By.ID, "rollout-group")).select_by_value("ui")
        stages = browser.find_element(By.ID, "rollout-stages")
        stages.clear()
        stages.send_keys("50 100")
        browser.find_element(By.ID, "start-rollout").click()
        until(browser, "the rollout page", lambda: "/ui/rollouts/" in browser.current_url)
        until(browser, "the rollout to succeed", lambda: text(browser, "rollout-state") == "succeeded", timeout=240)
        assert len(browser.find_elements(By.CSS_SELECTOR, "#stages .dot.succeeded")) == 2
        assert len(browser.find_elements(By.CSS_SELECTOR, "#stages .stage")) == 2
        history = text(browser, "history")  # the rollout's history, as it happened
        assert history.count("stage started") == 2 and history.count("device succeeded") == 2, history
        assert history.splitlines()[-1].split()[-1] != "halted"
        shot(browser, "rollout")
        browser.find_element(By.LINK_TEXT, "ui-dev-1").click()
        until(browser, "the device page", lambda: text(browser, "device-name") == "ui-dev-1")
        assert "succeeded" in text(browser, "history") and " B compressed" in text(browser, "history")
        shot(browser, "device")
        browser.get(url + "/ui/fleet?group=ui")
        assert text(browser, "devices").count(f"#{build_id}") == 2  # both run the build now
        slots = {d["id"]: d["slot"] for d in Client(url, server.admin_token).devices("ui")}
        assert set(slots.values()) <= {0, 1}, slots  # the slot each booted, as its state message said
        shot(browser, "fleet")
        for page in ("models", "builds", "rollouts", "tokens", "users"):  # the lists, for the docs
            browser.find_element(By.ID, f"nav-{page}").click()
            until(browser, f"the {page} page", lambda page=page: browser.current_url.endswith(f"/ui/{page}"))
            shot(browser, page)
    finally:
        for a in agents:
            a.stop()

    # sign out; a viewer sees and may not act
    browser.find_element(By.ID, "sign-out").click()
    until(browser, "the sign-in page", lambda: "/ui/login" in browser.current_url)
    shot(browser, "login")
    browser.get(url + "/ui/fleet")
    until(browser, "sent back to sign in", lambda: "/ui/login" in browser.current_url)
    viewer = _viewer(server)
    sign_in(browser, url, viewer)
    until(browser, "the viewer's fleet page", lambda: browser.current_url.endswith("/ui/fleet"))
    browser.find_element(By.ID, "nav-models").click()
    assert not browser.find_elements(By.ID, "upload-form")
    browser.find_element(By.ID, "nav-tokens").click()
    assert "does not allow it" in text(browser, "refusal")
    browser.get(url + f"/ui/builds/{build_id}")
    assert not browser.find_elements(By.ID, "deploy-this")


def _viewer(server) -> str:
    """A viewer of the admin's organisation, made through the API's own database (the server's sessions)."""
    from sqlalchemy.orm import sessionmaker

    from server.db import make_engine

    engine = make_engine(server.settings.database_url)
    try:
        with sessionmaker(engine)() as s:
            admin = principal_for_token(s, server.admin_token)
            _, token = create_user(s, "viewer-vic", s.get(Organization, admin.org_id), role="viewer")
    finally:
        engine.dispose()
    return token


def test_client_and_dashboard_agree_on_the_fleet(live, browser):
    """The API's device list and the dashboard's table show the same devices (one rule for both)."""
    from selenium.webdriver.common.by import By

    server = live["server"]
    client = Client(server.url, server.admin_token)
    sign_in(browser, server.url, server.admin_token)
    until(browser, "the fleet page", lambda: browser.current_url.endswith("/ui/fleet"))
    shown = sorted(e.text for e in browser.find_elements(By.CSS_SELECTOR, "a.device-name"))
    assert shown == sorted(d["id"] for d in client.devices())
