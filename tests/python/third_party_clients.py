"""Widely used third-party client libraries, unchanged, against Elo's sandbox simulators:
authenticate, write, read back.

- Salesforce: simple-salesforce (PyPI). It only speaks https to *.salesforce.com, so the
  session it is given resolves those hosts to the sandbox, as a DNS override would; the
  library's code runs as published.
- Magento 2: my-magento (PyPI), with its own `local=True` (plain http) option.
- RD Station Marketing: rdstation-python (PyPI), pointed at the sandbox through its `URL`
  setting (the library's only base-URL knob).

Usage: third_party_clients.py MAGENTO_HOSTPORT SALESFORCE_HOSTPORT RDSTATION_URL JWT_PRIVATE_KEY_FILE
"""

import sys
import urllib.parse

import requests
from requests.adapters import HTTPAdapter


class SandboxResolver(HTTPAdapter):
    """Sends https://<anything>.salesforce.com and https://<sandbox> to the sandbox over http."""

    def __init__(self, target):
        super().__init__()
        self.target = target

    def send(self, request, **kwargs):
        parts = urllib.parse.urlsplit(request.url)
        if parts.hostname.endswith(".salesforce.com") or parts.netloc == self.target:
            request.url = urllib.parse.urlunsplit(("http", self.target, parts.path, parts.query, parts.fragment))
        return super().send(request, **kwargs)


def salesforce(target, private_key):
    from simple_salesforce import Salesforce

    session = requests.Session()
    session.mount("https://", SandboxResolver(target))
    sf = Salesforce(consumer_key="elo-sandbox-client", consumer_secret="elo-sandbox-secret", domain="elo-sandbox.my", session=session)
    result = sf.Account.upsert("Elo_Id__c/c:1001", {"Name": "Ana Souza"})
    assert result == 201, f"created: {result}"
    assert sf.Account.upsert("Elo_Id__c/c:1001", {"Name": "Ana S. Souza"}) == 200, "updated"
    record = sf.Account.get_by_custom_id("Elo_Id__c", "c:1001")
    assert record["Name"] == "Ana S. Souza", record
    rows = sf.query("SELECT Id, Name FROM Account WHERE Elo_Id__c = 'c:1001'")
    assert rows["totalSize"] == 1 and rows["records"][0]["Id"] == record["Id"], rows
    print("simple-salesforce: authenticated, upserted and read back", record["Id"])
    # The JWT bearer flow, signed by the library with the connected app's private key.
    jwt_session = requests.Session()
    jwt_session.mount("https://", SandboxResolver(target))
    sf_jwt = Salesforce(username="integration@elo.example", consumer_key="elo-sandbox-client", privatekey_file=private_key,
                        domain="login", session=jwt_session)
    assert sf_jwt.Account.get_by_custom_id("Elo_Id__c", "c:1001")["Id"] == record["Id"]
    print("simple-salesforce: JWT bearer login accepted")


def magento(target):
    from magento import Client

    # A fixed user agent: without one the library looks one up on the internet.
    api = Client(target, "admin", "elo-sandbox-admin1", local=True, user_agent="elo-sandbox-test", log_level="WARNING", log_requests=False)
    product = api.products.by_sku("SKU-002")
    assert product is not None, "product found"
    assert product.update_stock(37), "stock updated"
    product.refresh()
    assert product.stock == 37, product.stock
    order = api.orders.by_id(1)
    assert order is not None and order.increment_id == "000000001", order
    print("my-magento: authenticated, updated stock and read back", product.sku, product.stock)


def rdstation(base_url):
    import rdstation.client as rd

    client = rd.Client(client_id="elo-rd-client", client_secret="elo-rd-secret")
    client.URL = base_url.rstrip("/") + "/"
    dialog = requests.get(client.authorization_url("http://localhost/callback"), allow_redirects=False)
    assert dialog.status_code == 302, dialog.status_code
    code = urllib.parse.parse_qs(urllib.parse.urlsplit(dialog.headers["location"]).query)["code"][0]
    tokens = client.get_access_token(code)
    assert tokens["expires_in"] == 86400, tokens
    client.set_token(tokens["access_token"])
    created = client.create_lead("CONVERSION", {"conversion_identifier": "checkout", "email": "lib@example.com", "name": "Lib Test"})
    assert "event_uuid" in created, created
    contact = client.get_contact_by_email("lib@example.com")
    assert contact["email"] == "lib@example.com" and contact["name"] == "Lib Test", contact
    refreshed = client.refresh_access_token(tokens["refresh_token"])
    assert refreshed["access_token"] != tokens["access_token"]
    print("rdstation-python: authenticated, converted and read back", contact["uuid"])


if __name__ == "__main__":
    magento_target, salesforce_target, rd_url, private_key = sys.argv[1:5]
    salesforce(salesforce_target, private_key)
    magento(magento_target)
    rdstation(rd_url)
    print("third-party clients passed")
