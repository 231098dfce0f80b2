#!/usr/bin/env python3
"""horizon_flow.py - drive Horizon in headless Chromium (Selenium, Debian's chromium and
chromium-driver) through an instance's life: log in; launch NAME from the Instances
panel's Launch Instance dialog (Source: IMAGE, Flavor: m1.tiny, Networks: NETWORK); see
it Active in the panel; open it; read its Log tab; delete it from the panel and see it
gone.  Screenshots of each step go to SHOTS.

    .venv-horizon/bin/python tools/horizon_flow.py URL USER PASSWORD IMAGE NETWORK NAME SHOTS

Horizon launches only where Neutron runs (its dialog asks Neutron for the networks, and
microversion 2.37 and later require them).  Prints one line per step ("ok: ...") and
"server: ID" once the instance is listed; exits 1 at the first step that fails."""
import os
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait


def main():
    base, user, password, image, network, name, shots = sys.argv[1:8]
    os.makedirs(shots, exist_ok=True)
    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1400,1000"):
        opts.add_argument(arg)
    opts.binary_location = "/usr/bin/chromium"
    d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    d.set_page_load_timeout(120)
    wait = WebDriverWait(d, 60)
    count = [0]

    def shot(what):
        count[0] += 1
        d.save_screenshot(os.path.join(shots, f"{count[0]:02d}-{what}.png"))
        print("ok:", what, flush=True)

    def step(title):
        wait.until(EC.element_to_be_clickable((By.XPATH, (
            "//div[contains(@class,'modal')]//li//a[starts-with(normalize-space(), "
            f"'{title}')]")))).click()

    def rows(text, allocated):
        """The visible rows naming text in the dialog's Allocated (or Available) table."""
        side = "transfer-allocated" if allocated else "transfer-available"
        return [r for r in d.find_elements(By.XPATH, (
            f"//div[contains(@class,'modal')]//*[contains(@class, '{side}')]"
            f"//tr[td[contains(normalize-space(.), '{text}')]]")) if r.is_displayed()]

    def allocate(text):
        """Move the row naming text from Available to Allocated (its row button), unless
        Horizon allocated it already (as it does when only one network is offered)."""
        WebDriverWait(d, 30).until(lambda drv: rows(text, True) or rows(text, False))
        if not rows(text, True):
            button = rows(text, False)[0].find_element(By.XPATH, ".//button")
            d.execute_script("arguments[0].click();", button)
        WebDriverWait(d, 30).until(lambda drv: rows(text, True))

    row = f"//table[@id='instances']//tr[td//a[normalize-space()='{name}']]"
    try:
        d.get(base + "/auth/login/")
        wait.until(EC.presence_of_element_located((By.ID, "id_username"))).send_keys(user)
        d.find_element(By.ID, "id_password").send_keys(password)
        d.find_element(By.ID, "loginBtn").click()
        wait.until(EC.url_contains("/project"))
        shot("logged-in")
        d.get(base + "/project/instances/")
        wait.until(EC.element_to_be_clickable((By.ID, "instances__action_launch-ng"))).click()
        wait.until(EC.visibility_of_element_located((By.NAME, "name"))).send_keys(name)
        step("Source")
        allocate(image)
        step("Flavor")
        allocate("m1.tiny")
        step("Networks")
        allocate(network)
        launch = wait.until(EC.element_to_be_clickable((By.XPATH, (
            "//div[contains(@class,'modal')]//button[contains(@class,'finish')]"))))
        shot("launch-dialog")
        launch.click()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            d.get(base + "/project/instances/")
            wait.until(EC.presence_of_element_located((By.ID, "instances")))
            found = d.find_elements(By.XPATH, row)
            if found and "Error" in found[0].text:
                raise RuntimeError(f"{name} is listed in Error: {found[0].text}")
            if found and "Active" in found[0].text:
                break
            time.sleep(2)
        else:
            raise TimeoutError(f"{name} is not listed Active")
        shot("instance-active")
        d.find_element(By.XPATH, row + f"//a[normalize-space()='{name}']").click()
        wait.until(EC.url_matches(r"/project/instances/[0-9a-f-]{36}/"))
        server_id = d.current_url.split("/project/instances/")[1].split("/")[0]
        print("server:", server_id, flush=True)
        shot("instance-detail")
        wait.until(EC.element_to_be_clickable((By.XPATH, (
            "//ul[contains(@class,'nav-tabs')]//a[normalize-space()='Log']")))).click()
        # a guest that has written nothing yet shows an empty log: as a user would, ask
        # again (the tab's Go button) until it has
        deadline = time.monotonic() + 120
        while True:
            try:
                log = WebDriverWait(d, 10).until(lambda drv: [
                    p.text.strip() for p in drv.find_elements(
                        By.XPATH, "//pre[contains(@class, 'logs')]")
                    if p.is_displayed() and p.text.strip()])
                break
            except TimeoutException:
                if time.monotonic() > deadline:
                    raise
                d.find_element(By.XPATH, "//button[normalize-space()='Go']").click()
        shot("console-log")
        print("console log:", log[0].splitlines()[-1][:200])
        d.get(base + "/project/instances/")
        wait.until(EC.element_to_be_clickable((By.XPATH, row + "//a[contains(@class, "
                                                   "'dropdown-toggle')]"))).click()
        wait.until(EC.element_to_be_clickable((
            By.ID, f"instances__row_{server_id}__action_delete"))).click()
        wait.until(EC.element_to_be_clickable((By.XPATH, (
            "//div[contains(@class,'modal')]//*[contains(@class,'btn-danger')]")))).click()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            d.get(base + "/project/instances/")
            wait.until(EC.presence_of_element_located((By.ID, "instances")))
            if not d.find_elements(By.XPATH, row):
                break
            time.sleep(2)
        else:
            raise TimeoutError(f"{name} is still listed")
        shot("instance-deleted")
        return 0
    except Exception as e:  # noqa: BLE001 - report the step that failed
        d.save_screenshot(os.path.join(shots, "failed.png"))
        print(f"failed after {count[0]} steps: {type(e).__name__}: {e}"[:2000], flush=True)
        return 1
    finally:
        d.quit()


if __name__ == "__main__":
    sys.exit(main())
