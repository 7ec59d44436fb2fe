"""Make docs/images/web_chat.png: serve a checkpoint, ask the chat page a question in headless
Chromium, and save a screenshot of the streamed answer.

    python docs/web_screenshot.py --ckpt=out/sft/ckpt.pt --question=成语“画蛇添足”是什么意思？

Needs Debian's chromium and chromium-driver and `pip install selenium`.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="out/sft/ckpt.pt")
    parser.add_argument("--tokenizer", default="data/tokenizer/tokenizer.model")
    parser.add_argument("--question", action="append", default=[])
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "images", "web_chat.png"))
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    from selenium import webdriver
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), f"--ckpt={args.ckpt}",
                               f"--tokenizer={args.tokenizer}", f"--port={args.port}", "--max_tokens=64"])
    url = f"http://127.0.0.1:{args.port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{url}/v1/models", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium")
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--no-first-run", "--window-size=900,600", f"--user-data-dir={tempfile.mkdtemp()}"):
            options.add_argument(flag)
        browser = webdriver.Chrome(options=options,
                                   service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")))
        browser.get(url)
        for turn, question in enumerate(args.question or ["成语“画蛇添足”是什么意思？"], 1):
            browser.find_element("id", "question").send_keys(question)
            browser.find_element("id", "send").click()
            while browser.execute_script("return messages.length") < 2 * turn:
                time.sleep(0.1)
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        browser.save_screenshot(args.out)
        browser.quit()
        print(f"wrote {args.out}")
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
