#!/usr/bin/env python
"""Screenshot a dcam report with headless Chromium and list what the browser complained about.

    python scripts/screenshot_report.py REPORT_HTML OUT_PNG [--window-size 1400,3000]

Needs Debian's `chromium` package (apt-get update && apt-get install -y chromium). Not part of CI.
Chromium runs offline-minded (no background networking, no component updates, no sync, a fresh
temporary profile). Its log goes to stderr (--enable-logging=stderr --v=0); the lines that are
console messages or errors are printed as one JSON object together with the screenshot's size.
Exit status: 0 when the PNG was written, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

BINARIES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Noise of headless Chromium in containers (no D-Bus, no GPU process, ...): not the page's problems.
NOISE = re.compile(r"dbus|bus\.cc|Fontconfig|gpu_init|viz_main|angle|GLES|vaapi|sandbox|zygote|"
                   r"crashpad|inotify|UPower|memory_pressure|ProcessSingleton|shared_image|"
                   r"Skia|egl|gl_|ozone|policy|variations|On_?Device|optimization_guide", re.I)


def find_chromium() -> str:
    """Path of the first Chromium-like binary on PATH (exits with an install hint if none)."""
    for name in BINARIES:
        path = shutil.which(name)
        if path:
            return path
    sys.exit("chromium not found: apt-get update && apt-get install -y chromium")


def screenshot(html: str, out_png: str, size: str = "1400,3000", timeout: float = 120.0) -> dict:
    """Run headless Chromium on file://html; returns {png, bytes, console, errors, returncode}."""
    out_png = os.path.abspath(out_png)
    if os.path.exists(out_png):
        os.remove(out_png)
    with tempfile.TemporaryDirectory(prefix="dcam-chromium-") as profile:
        cmd = [find_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={out_png}",
               f"--window-size={size}", "--enable-logging=stderr", "--v=0", "file://" + os.path.abspath(html)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    log = (proc.stderr or "").splitlines()
    console = [ln for ln in log if "CONSOLE" in ln]
    errors = [ln for ln in log if (":ERROR:" in ln or ":FATAL:" in ln) and not NOISE.search(ln)]
    return dict(png=out_png, bytes=os.path.getsize(out_png) if os.path.exists(out_png) else 0, console=console,
                errors=errors, ignored_noise=sum(1 for ln in log if ":ERROR:" in ln and NOISE.search(ln)),
                returncode=proc.returncode)


def main(argv=None) -> int:
    """CLI entry point: screenshot, print the JSON result, exit 0 when the PNG exists."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("report_html")
    p.add_argument("out_png")
    p.add_argument("--window-size", default="1400,3000")
    a = p.parse_args(argv)
    res = screenshot(a.report_html, a.out_png, a.window_size)
    print(json.dumps(res, indent=1))
    return 0 if res["bytes"] else 1


if __name__ == "__main__":
    sys.exit(main())
