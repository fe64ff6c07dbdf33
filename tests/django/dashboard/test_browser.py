"""The dashboard in a real headless browser (Debian's chromium, driven by Selenium) against a live
daphne server on the test database: staff log in and see charts with data, revoke a key through
the page, and a user who is not staff cannot get in.

Rows are committed (the server is another process) under unique names and deleted at the end.
Screenshots go to $TMPDIR/dashboard-screenshots, outside the repository, for a person to look at.
"""
from __future__ import annotations

import secrets
import shutil
import tempfile
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model

from tenants.dashboard.selectors import batch_model
from tenants.errors import InvalidApiKey
from tenants.models import AuditLog
from tenants.selectors import authenticate_api_key
from tests.django.dashboard.conftest import PASSWORD, make_batch, make_busy_tenant, make_user
from tests.django.live_server import daphne_server

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SCREENSHOTS = Path(tempfile.gettempdir()) / "dashboard-screenshots"


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        if shutil.which("apt-get") is None:
            pytest.skip("no chromium and no apt-get to install it")
        pytest.fail(f"{CHROMIUM} or {CHROMEDRIVER} is missing: run scripts/ensure_browser as root "
                    "(apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1400,1000", "--lang=en-US"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def live_server(django_test_database, tmp_path_factory):
    """daphne serving the test database with DEBUG off, as in production (CSS is inline).
    "localhost", not 127.0.0.1: with DEBUG off the session cookie is Secure, which Chromium keeps
    over plain http only for localhost."""
    log_path = tmp_path_factory.mktemp("dashboard") / "daphne.log"
    with daphne_server(log_path=log_path, ready_path="/dashboard/login/", host="localhost") as base_url:
        yield base_url


@pytest.fixture
def committed_rows(heartbeat):
    """A busy tenant (and its batch job when the batch API exists) plus two users, deleted afterwards."""
    tenant, raw_key = make_busy_tenant(name=f"browser-{secrets.token_hex(4)}")
    if batch_model() is not None:
        make_batch(tenant=tenant, total=240, completed=150, failed=6)
    staff, user = make_user(staff=True), make_user(staff=False)
    yield tenant, raw_key, staff, user
    tenant.delete()
    get_user_model().objects.filter(pk__in=[staff.pk, user.pk]).delete()


def log_in(browser, base_url: str, username: str):
    from selenium.webdriver.common.by import By

    browser.delete_all_cookies()
    browser.get(f"{base_url}/dashboard/")
    assert "/dashboard/login/" in browser.current_url
    browser.find_element(By.NAME, "username").send_keys(username)
    browser.find_element(By.NAME, "password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()


def screenshot(browser, name: str) -> Path:
    """The whole page, however long: the window is stretched to the document's height first."""
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1400, height + 140)
    SCREENSHOTS.mkdir(exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    browser.save_screenshot(str(path))
    browser.set_window_size(1400, 1000)
    print(f"screenshot: {path}")
    return path


def test_staff_see_charts_and_revoke_a_key(browser, live_server, committed_rows):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    tenant, raw_key, staff, _ = committed_rows
    log_in(browser, live_server, staff.username)
    WebDriverWait(browser, 15).until(expected_conditions.title_contains("Overview"))

    bars = browser.find_elements(By.CSS_SELECTOR, "figure.chart svg rect.bar")
    points = browser.find_elements(By.CSS_SELECTOR, "figure.chart svg circle.point")
    assert len(bars) == 28 and len(points) == 28
    drawn = [bar for bar in bars if float(bar.get_attribute("data-value")) > 0]
    assert len(drawn) >= 6 and all(bar.rect["height"] > 0 for bar in drawn)  # laid out, not just markup
    assert tenant.name in browser.find_element(By.ID, "top-tenants").text
    assert "acme/test-model" in browser.find_element(By.ID, "engines").text
    if batch_model() is not None:
        assert "150 / 6 / 240" in browser.find_element(By.ID, "batches").text
    screenshot(browser, "overview")

    browser.find_element(By.LINK_TEXT, tenant.name).click()
    WebDriverWait(browser, 15).until(expected_conditions.title_contains(tenant.name))
    status = browser.find_element(By.CSS_SELECTOR, "#keys .key-status")
    assert status.text == "active"
    browser.find_element(By.CSS_SELECTOR, "#keys button.danger").click()
    WebDriverWait(browser, 5).until(expected_conditions.alert_is_present()).accept()
    WebDriverWait(browser, 15).until(
        lambda b: b.find_element(By.CSS_SELECTOR, "#keys .key-status").text == "revoked")
    assert "Revoked key" in browser.find_element(By.CSS_SELECTOR, ".messages").text
    screenshot(browser, "tenant")

    with pytest.raises(InvalidApiKey):
        authenticate_api_key(raw_key=raw_key)
    assert AuditLog.objects.get(action="api_key.revoke", tenant=tenant).actor == staff


def page_scrolls_sideways(browser) -> bool:
    return browser.execute_script(
        "return document.documentElement.scrollWidth > document.documentElement.clientWidth")


def test_pages_fit_a_1024_pixel_window_and_login_lands_on_the_overview(browser, live_server, committed_rows):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    tenant, _, staff, _ = committed_rows
    browser.set_window_size(1024, 900)
    try:
        browser.delete_all_cookies()
        browser.get(f"{live_server}/dashboard/login/")  # no ?next=
        browser.find_element(By.NAME, "username").send_keys(staff.username)
        browser.find_element(By.NAME, "password").send_keys(PASSWORD)
        browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        WebDriverWait(browser, 15).until(expected_conditions.title_contains("Overview"))
        assert browser.current_url.rstrip("/").endswith("/dashboard")
        assert "acme/test-model" in browser.find_element(By.ID, "engines").text
        assert not page_scrolls_sideways(browser), "the overview scrolls sideways at 1024 px"
        browser.get(f"{live_server}/dashboard/tenants/{tenant.pk}/")
        WebDriverWait(browser, 15).until(expected_conditions.title_contains(tenant.name))
        assert not page_scrolls_sideways(browser), "the tenant page scrolls sideways at 1024 px"
    finally:
        browser.set_window_size(1400, 1000)


def test_a_user_who_is_not_staff_cannot_get_in(browser, live_server, committed_rows):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    _, _, _, user = committed_rows
    log_in(browser, live_server, user.username)
    # The click returns before the refusal page has loaded: wait for it.
    errors = WebDriverWait(browser, 15).until(
        expected_conditions.presence_of_element_located((By.CSS_SELECTOR, ".errorlist")))
    assert "staff account" in errors.text
    screenshot(browser, "refused")
    browser.get(f"{live_server}/dashboard/")
    assert "/dashboard/login/" in browser.current_url
