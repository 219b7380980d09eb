"""Integration tests of service.py over HTTPS, with TLS 1.2 and TLS 1.3 clients.

    python -m pytest test_service.py                            # just the tests
    sudo .venv/bin/python -m pytest test_service.py --keytap capture.pcapng
                                                                # and their traffic, decryptable

The service runs under /usr/bin/python3, whose ssl module uses the system's libssl3, which
keytap instruments.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

SERVICE = Path(__file__).with_name("service.py")


@pytest.fixture(scope="session")
def service() -> Iterator[str]:
    """The service's base URL, e.g. https://127.0.0.1:43127, for the whole session."""
    process = subprocess.Popen(["/usr/bin/python3", str(SERVICE)], stdout=subprocess.PIPE,
                               text=True)
    url = process.stdout.readline().strip()
    assert url.startswith("https://"), "service.py did not start"
    yield url
    process.terminate()
    process.wait()


def call(url: str, tls: ssl.TLSVersion, document: object = None) -> tuple[int, object]:
    """One request on a new connection: GET, or POST with a JSON body; (status, JSON reply)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the service's certificate is self-signed
    context.minimum_version = context.maximum_version = tls
    data = None if document is None else json.dumps(document).encode()
    request = urllib.request.Request(url, data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, context=context, timeout=10) as response:
        return response.status, json.load(response)


def test_health_tls13(service: str) -> None:
    assert call(f"{service}/health", ssl.TLSVersion.TLSv1_3) == (200, {"status": "ok"})


def test_list_items_tls12(service: str) -> None:
    status, items = call(f"{service}/items", ssl.TLSVersion.TLSv1_2)
    assert status == 200
    assert [item["name"] for item in items] == ["apple", "pear"]


def test_create_item_tls13(service: str) -> None:
    status, item = call(f"{service}/items", ssl.TLSVersion.TLSv1_3, {"name": "plum"})
    assert (status, item) == (201, {"id": 3, "name": "plum"})
