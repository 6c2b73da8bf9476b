"""Reading a server's Prometheus metrics, as a scraper would."""

import re
import urllib.request

METRICS_AT = re.compile(r"metrics on http://127\.0\.0\.1:(\d+)/metrics")
METRICS_FLAGS = ("--metrics-port", "0", "--metrics-host", "127.0.0.1")


def scrape(server) -> str:
    """The /metrics text of a server started with METRICS_FLAGS (its log says the port)."""
    port = METRICS_AT.search(server.log()).group(1)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def metric(text: str, name: str, **labels) -> float:
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            rest = line[len(name):]
            if rest.startswith((" ", "{")):
                return float(line.rsplit(" ", 1)[1])
    raise KeyError(f"{name} {labels} not in metrics")
