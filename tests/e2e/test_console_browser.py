"""The web console in a real browser (Debian's Chromium driven by Playwright) against real
daemons: sign in, run a test failover and a failover with its typed confirmation from the
pages, and check what the pages show and what landed on the DR host.

Screenshots of every page go to ``test-artifacts/console/`` (the README's come from there).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.e2e.conftest import Drill, protect_and_replicate

CHROMIUM = "/usr/bin/chromium"
DONE = re.compile(r"\?done=")  # back on the timeline after a job succeeded
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "console"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def shot(page: Page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def unlabelled_fields(page: Page) -> list[str]:
    """Visible form fields without a label (every field must have one)."""
    return page.evaluate(  # type: ignore[no-any-return]
        """() => Array.from(document.querySelectorAll('input, select, textarea'))
              .filter(e => e.type !== 'hidden' && e.labels.length === 0)
              .map(e => e.name || e.id)"""
    )


def overflowing(page: Page) -> list[str]:
    """Elements that stick out sideways (none may, even on a phone; a table scrolls
    inside its own box)."""
    return page.evaluate(  # type: ignore[no-any-return]
        """() => Array.from(document.querySelectorAll('body *'))
              .filter(e => !e.closest('.scroll'))
              .filter(e => e.getBoundingClientRect().right > window.innerWidth + 1)
              .map(e => e.tagName.toLowerCase() + (e.id ? '#' + e.id : '')
                        + (e.className ? '.' + String(e.className).split(' ').join('.') : ''))"""
    )


def signed_in(browser: Browser, url: str, token: str) -> Page:
    """A new browser context signed in to the console at ``url``."""
    page = browser.new_context(
        ignore_https_errors=True, viewport={"width": 1280, "height": 900}
    ).new_page()
    page.set_default_timeout(60_000)
    page.goto(f"{url}/sign-in")
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(f"{url}/apps")
    return page


def test_operator_drives_the_dr_lifecycle_from_the_pages(
    drill: Drill, browser: Browser, tmp_path: Path
) -> None:
    d = drill
    data = tmp_path / "shop"
    data.mkdir()
    (data / "orders.txt").write_text("order 1\norder 2\n")
    protect_and_replicate(d, "shop", "filesystem", data)
    console = d.dr.url

    context = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)

    # --- sign-in: pages send you there, a wrong token is refused, a right one lets you in
    page.goto(f"{console}/apps")
    expect(page).to_have_url(f"{console}/sign-in?next=%2Fapps")
    assert unlabelled_fields(page) == []
    page.get_by_label("API token").fill("not-a-token")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("That token is wrong")
    shot(page, "sign-in")
    page.get_by_label("API token").fill(d.dr.token)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(f"{console}/apps")

    # --- App Manager
    row = page.locator('tr[data-app="shop"]')
    expect(row).to_contain_text("managed")
    expect(row).to_contain_text("filesystem")
    shot(page, "app-manager")

    # --- Access: the replica on the timeline, test failover onto host2
    row.get_by_role("link", name="shop").click()
    expect(page).to_have_url(f"{console}/apps/shop")
    timeline = page.locator("#timeline li")
    expect(timeline.first).to_have_attribute("data-kind", "replica")
    assert unlabelled_fields(page) == []
    test_copy = tmp_path / "dr-test"
    page.locator("#op-test-failover summary").click()
    page.locator("#tf-host").select_option("host2")
    page.locator("#tf-mp").fill(str(test_copy))
    shot(page, "access")
    page.locator("#op-test-failover").get_by_role("button", name="Test Failover").click()
    # the job's page follows it live, then returns to the timeline when it succeeded
    expect(page).to_have_url(DONE, timeout=90_000)
    expect(page.locator("#done")).to_contain_text("succeeded")
    expect(page.locator("#timeline li").first).to_have_attribute("data-kind", "test-failover")
    assert (test_copy / "orders.txt").read_text() == "order 1\norder 2\n"

    # the test copy is withdrawn and deleted from its own page
    page.locator("#op-unmount summary").click()
    page.locator("#op-unmount").get_by_role("button", name="Unmount").click()
    expect(page.locator("#image-facts")).to_contain_text("ready")
    assert not test_copy.exists()
    page.locator("#op-delete summary").click()
    page.locator("#op-delete").get_by_role("button", name="Delete").click()
    expect(page).to_have_url(DONE, timeout=90_000)
    expect(page.locator('#timeline li[data-kind="test-failover"]')).to_have_count(0)

    # --- Failover: the button waits for the typed confirmation
    page.locator('#timeline li[data-kind="replica"] a').first.click()
    page.locator("#op-failover summary").click()
    form = page.locator("#op-failover form")
    button = form.get_by_role("button", name="Failover")
    expect(button).to_be_disabled()
    target = tmp_path / "dr-live"
    page.locator("#fo-host").select_option("host2")
    page.locator("#fo-mp").fill(str(target))
    page.locator("#fo-label").fill("drill from the console")
    page.locator("#fo-confirm").fill("failover")
    expect(button).to_be_disabled()
    page.locator("#fo-confirm").fill("FAILOVER")
    expect(button).to_be_enabled()
    button.click()
    expect(page).to_have_url(DONE, timeout=90_000)
    expect(page.locator("#app-state")).to_have_text("failed-over")
    newest = page.locator("#timeline li").first
    expect(newest).to_have_attribute("data-kind", "failover")
    expect(newest).to_contain_text("drill from the console")
    assert (target / "orders.txt").read_text() == "order 1\norder 2\n"
    ops = page.locator("#operations summary")
    expect(ops).to_contain_text(["Syncback", "Failback (snapshot style)"])
    shot(page, "access-failed-over")

    # --- Monitor and the drill report
    page.get_by_role("link", name="Monitor").click()
    failover_row = page.locator('#jobs tr[data-status="succeeded"]', has_text="failover").first
    expect(failover_row).to_contain_text("shop")
    shot(page, "monitor")
    failover_row.get_by_role("link").first.click()
    expect(page.locator("#job")).to_contain_text("succeeded")
    expect(page.locator(".log")).to_contain_text("writer epoch")
    shot(page, "job")
    page.goto(f"{console}/apps/shop/report")
    expect(page.locator('#steps tr[data-step="failover"]')).to_contain_text("succeeded")
    expect(page.locator('#steps tr[data-step="test-failover"]')).to_contain_text("succeeded")
    expect(page.locator('#summary [data-field="rpo"]')).to_contain_text("s")
    shot(page, "drill-report")

    # --- a narrow screen: everything still reachable without sideways scrolling
    page.set_viewport_size({"width": 390, "height": 844})
    for path in ("/apps", "/apps/shop", "/monitor"):
        page.goto(f"{console}{path}")
        assert overflowing(page) == [], path
    shot(page, "monitor-narrow")
    page.goto(f"{console}/apps/shop")
    shot(page, "access-narrow")

    # --- bring the DR writes home: syncback at DR, restore at production, failback at DR
    page.set_viewport_size({"width": 1280, "height": 900})
    (target / "orders.txt").write_text("order 1\norder 2\norder 3 taken at the DR site\n")
    page.goto(f"{console}/apps/shop")
    page.locator("#op-syncback summary").click()
    page.locator("#sb-label").fill("final")
    page.locator("#op-syncback").get_by_role("button", name="Syncback").click()
    expect(page).to_have_url(DONE, timeout=90_000)
    expect(page.locator("#done")).to_contain_text("succeeded")

    prod = signed_in(browser, d.prod.url, d.prod.token)
    expect(prod.locator('tr[data-app="shop"]')).to_contain_text("mirrored")
    shot(prod, "app-manager-prod")
    prod.goto(f"{d.prod.url}/apps/shop")
    prod.locator('#timeline li[data-kind="syncback"] a').first.click()
    prod.locator("#op-restore summary").click()
    # two warnings, one after the other (SPEC §4.4): the second only once the first is accepted
    restore = prod.locator("#op-restore form")
    expect(prod.locator("#rs-confirm2")).to_have_count(0)
    expect(restore).not_to_contain_text("OVERWRITE OTHER APPS")
    go_on = restore.get_by_role("button", name="Continue")
    expect(go_on).to_be_disabled()
    prod.locator("#rs-confirm").fill("data loss")
    expect(go_on).to_be_disabled()
    prod.locator("#rs-confirm").fill("DATA LOSS")
    expect(go_on).to_be_enabled()
    shot(prod, "access-restore-first")
    go_on.click()
    expect(prod.locator("#rs-first")).to_contain_text("First warning accepted")
    expect(prod.locator("#rs-confirm")).to_have_count(0)
    go = restore.get_by_role("button", name="Restore to production")
    expect(go).to_be_disabled()
    prod.locator("#rs-confirm2").fill("OVERWRITE OTHER APPS")
    expect(go).to_be_enabled()
    shot(prod, "access-restore")
    go.click()
    expect(prod).to_have_url(DONE, timeout=90_000)
    expect(prod.locator("#done")).to_contain_text("succeeded")
    assert (data / "orders.txt").read_text() == (target / "orders.txt").read_text()
    prod.goto(f"{d.prod.url}/apps/shop/report")
    expect(prod.locator('#steps tr[data-step="restore"]')).to_contain_text("succeeded")
    expect(prod.locator('#summary [data-field="downtime"]')).to_contain_text(" s")
    prod.context.close()

    page.goto(f"{console}/apps/shop")
    page.locator('#timeline li[data-kind="failover"] a').click()
    page.locator("#op-failback summary").click()
    page.locator("#op-failback").get_by_role("button", name="Failback (snapshot style)").click()
    expect(page).to_have_url(DONE, timeout=90_000)
    expect(page.locator("#app-state")).to_have_text("managed")
    expect(page.locator('#timeline li[data-kind="failover"]')).to_have_count(0)

    # --- sign-out ends the session, on the server: its cookie replayed is refused
    kept = context.cookies()
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(f"{console}/sign-in")
    page.goto(f"{console}/monitor")
    expect(page).to_have_url(re.compile("/sign-in"))
    context.add_cookies(kept)  # type: ignore[arg-type]
    page.goto(f"{console}/monitor")
    expect(page).to_have_url(re.compile("/sign-in"))
    expect(page.get_by_role("alert")).to_contain_text("Your session has ended")
    context.close()


def test_keyboard_alone_signs_in_and_reaches_an_app(drill: Drill, browser: Browser) -> None:
    context = browser.new_context(ignore_https_errors=True)
    page = context.new_page()
    page.goto(f"{drill.prod.url}/apps")
    assert page.evaluate("() => document.activeElement.id") == "token"  # the caret is there
    page.keyboard.type(drill.prod.token)
    page.keyboard.press("Enter")
    expect(page).to_have_url(f"{drill.prod.url}/apps")
    for _ in range(20):  # Tab through the page until the app's link has the focus
        page.keyboard.press("Tab")
        if page.evaluate("() => document.activeElement.textContent") == "shop":
            break
    else:
        raise AssertionError("the app's link cannot be reached with the keyboard")
    page.keyboard.press("Enter")
    expect(page).to_have_url(f"{drill.prod.url}/apps/shop")
    context.close()
