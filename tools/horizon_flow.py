#!/usr/bin/env python3
"""horizon_flow.py - drive Horizon in headless Chromium (Selenium, Debian's chromium and
chromium-driver): log in, launch an instance from the Instances panel, wait for it to be
Active, read its console log, delete it.  Screenshots of each step go to SHOTS.

    .venv-horizon/bin/python tools/horizon_flow.py URL USER PASSWORD IMAGE SHOTS [NETWORK]

Prints one line per step ("ok: ..."); exits 1 at the first step that fails."""
import os
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

NAME = "horizon-vm"


def main():
    base, user, password, image, shots = sys.argv[1:6]
    network = sys.argv[6] if len(sys.argv) > 6 else None
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

    def allocate(text):
        """Move the row naming text from Available to Allocated (its row button)."""
        found = WebDriverWait(d, 30).until(lambda drv: [
            b for b in drv.find_elements(By.XPATH, (
                "//div[contains(@class,'modal')]//tr[td[contains(normalize-space(.), "
                f"'{text}')]]//button")) if b.is_displayed()])
        d.execute_script("arguments[0].click();", found[-1])

    row = f"//table[@id='instances']//tr[td//a[normalize-space()='{NAME}']]"
    try:
        d.get(base + "/auth/login/")
        wait.until(EC.presence_of_element_located((By.ID, "id_username"))).send_keys(user)
        d.find_element(By.ID, "id_password").send_keys(password)
        d.find_element(By.ID, "loginBtn").click()
        wait.until(EC.url_contains("/project"))
        shot("logged-in")
        d.get(base + "/project/instances/")
        wait.until(EC.element_to_be_clickable((By.ID, "instances__action_launch-ng"))).click()
        wait.until(EC.visibility_of_element_located((By.NAME, "name"))).send_keys(NAME)
        step("Source")
        allocate(image)
        step("Flavor")
        allocate("m1.tiny")
        if network:
            step("Networks")
            allocate(network)
        shot("launch-dialog")
        wait.until(EC.element_to_be_clickable((By.XPATH, (
            "//div[contains(@class,'modal')]//button[contains(@class,'finish')]")))).click()
        WebDriverWait(d, 180, poll_frequency=2).until(lambda drv: "Active" in (
            drv.find_element(By.XPATH, row).text if drv.find_elements(By.XPATH, row) else ""))
        shot("instance-active")
        d.find_element(By.XPATH, row + f"//a[normalize-space()='{NAME}']").click()
        wait.until(EC.url_matches(r"/project/instances/[0-9a-f-]{36}/"))
        server_id = d.current_url.split("/project/instances/")[1].split("/")[0]
        shot("instance-detail")
        d.get(base + f"/project/instances/{server_id}/?tab=instance_details__log")
        log = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "pre.logs")))
        WebDriverWait(d, 60).until(lambda drv: log.text.strip())
        shot("console-log")
        print("console log:", log.text.strip().splitlines()[-1][:200])
        d.get(base + "/project/instances/")
        wait.until(EC.element_to_be_clickable((By.XPATH, row + "//input[@type='checkbox']")))
        d.execute_script("arguments[0].click();",
                         d.find_element(By.XPATH, row + "//input[@type='checkbox']"))
        wait.until(EC.element_to_be_clickable((By.ID, "instances__action_delete"))).click()
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
            raise TimeoutError(f"{NAME} is still listed")
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
