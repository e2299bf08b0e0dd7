"""The Serve application over HTTP: ranking = offline PE-MoE ranking, input limits, API key, thumbnails,
degradation, schemathesis, the search page in headless Chromium, and the in-place index hot swap.

The app is deployed once for the module (declaratively, from serve_config.yaml, as `serve run` does).
"""

from __future__ import annotations

import io
import json
import os
import time
from urllib.parse import quote

import numpy as np
import pytest
import requests

from tests.helpers import free_port
from tests.serve_fixtures import PLATFORMS, REPO, app_config, deploy, make_tiny_run, wait_running

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]
APP = "geoloc"


class Served:
    def __init__(self, run, url: str):
        self.run, self.url = run, url

    def search(self, body, **kw) -> requests.Response:
        return requests.post(self.url + "/search", json=body, timeout=60, **kw)


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    from ray import serve

    run = make_tiny_run(tmp_path_factory.mktemp("serve_run"))
    port = free_port()
    deploy(app_config(run, run.build_a, expert_timeout_s=5.0, shard_timeout_s=5.0), port)
    try:
        wait_running(APP)
        yield Served(run, f"http://127.0.0.1:{port}")
    finally:
        serve.shutdown()


def _handle(deployment: str):
    from ray import serve

    return serve.get_deployment_handle(deployment, app_name=APP)


def offline_top(run, build: str, query: str, k: int, drop: str | None = None,
                platforms: list[str] | None = None) -> tuple[list[str], np.ndarray]:
    """The exact PE-MoE ranking computed in-process: fused query (gate) . gallery vectors (of `platforms`)."""
    import torch

    from geoloc_ray.model import fuse_query, load_model
    from geoloc_ray.preprocess.text import clean_query

    model = load_model(run.model_uri).eval()
    with torch.no_grad():
        trunk = model.text_trunk_output([clean_query(query)])
        gate = model.gate(trunk)
        parts = [model.text_head(p, trunk) for p in PLATFORMS]
    if drop is not None:  # what the server does without that expert: zero block, gate renormalised
        keep = torch.tensor([[p != drop for p in PLATFORMS]], dtype=torch.float32)
        gate = gate * keep / (gate * keep).sum()
    q = fuse_query(parts, gate)[0].numpy()
    vectors, ids = run.vectors(build)
    if platforms is not None:
        platform_of = dict(zip(run.frame["image_id"], run.frame["platform"], strict=True))
        keep = [i for i, image_id in enumerate(ids) if platform_of[image_id] in platforms]
        vectors, ids = vectors[keep], [ids[i] for i in keep]
    scores = vectors @ q
    order = np.argsort(-scores, kind="stable")[:k]
    return [ids[i] for i in order], scores[order]


# ----- the answer -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("query", ["a tall building with a red roof next to a parking lot", "river bridge"])
def test_http_topk_equals_offline_fused_ranking(served, query):
    r = served.search({"query": query, "k": 10})
    assert r.status_code == 200, r.text
    body = r.json()
    ids, scores = offline_top(served.run, served.run.build_a, query, 10)
    assert [x["image_id"] for x in body["results"]] == ids
    np.testing.assert_allclose([x["score"] for x in body["results"]], scores, atol=1e-4)
    assert body["degraded"] is False and body["failed_experts"] == [] and body["failed_shards"] == []
    assert set(body["gate"]) == set(PLATFORMS) and abs(sum(body["gate"].values()) - 1) < 1e-5
    assert body["model_version"] == served.run.model_version and body["index_build"] == served.run.build_a
    assert body["took_ms"] > 0


def test_result_fields(served):
    body = served.search({"query": "a park with trees", "k": 100}).json()
    assert len(body["results"]) == 24  # k larger than the gallery: every image once, merged over 2 shards
    assert len({x["image_id"] for x in body["results"]}) == 24
    frame = served.run.frame.set_index("image_id")
    for x in body["results"]:
        row = frame.loc[x["image_id"]]
        assert (x["location_id"], x["platform"]) == (row["location_id"], row["platform"])
        assert x["lat"] is None if np.isnan(row["lat"]) else x["lat"] == pytest.approx(row["lat"])
        assert x["thumbnail_url"] == "/thumbnail?id=" + quote(x["image_id"], safe="")
    assert [x["rank"] for x in body["results"]] == list(range(1, 25))
    assert served.search({"query": "a park"}).json()["k"] == 10  # default k


# ----- places, filters, paging -----------------------------------------------------------------------------------
QUERY = "a tall building with a red roof next to a parking lot"


def _places(ids: list[str], scores: np.ndarray, frame) -> tuple[list[str], list[float]]:
    """Each location's first image of a full ranking: the offline answer to group_by location."""
    location = dict(zip(frame["image_id"], frame["location_id"], strict=True))
    seen, out = set(), []
    for image_id, score in zip(ids, scores, strict=True):
        if location[image_id] not in seen:
            seen.add(location[image_id])
            out.append((image_id, float(score)))
    return [i for i, _ in out], [sc for _, sc in out]


def test_group_by_location_gives_distinct_places_ranked_by_their_best_image(served):
    run = served.run
    ids, scores = offline_top(run, run.build_a, QUERY, 24)
    place_ids, place_scores = _places(ids, scores, run.frame)
    assert len(place_ids) == 8 and len(ids) > 8  # build A: 8 locations, 3 images each
    for k in (3, 5, 8):
        body = served.search({"query": QUERY, "k": k, "group_by": "location"}).json()
        got = body["results"]
        assert [x["image_id"] for x in got] == place_ids[:k] and body["group_by"] == "location"
        assert len({x["location_id"] for x in got}) == k
        np.testing.assert_allclose([x["score"] for x in got], place_scores[:k], atol=1e-4)
    body = served.search({"query": QUERY, "k": 20, "group_by": "location"}).json()
    assert [x["image_id"] for x in body["results"]] == place_ids  # the gallery holds 8 places: all of them


@pytest.mark.parametrize("platforms", [["drone"], ["satellite", "ground"], ["ground", "drone", "satellite"]])
def test_platform_filter_equals_the_exact_ranking_restricted_to_them(served, platforms):
    run = served.run
    ids, scores = offline_top(run, run.build_a, QUERY, 24, platforms=platforms)
    body = served.search({"query": QUERY, "k": 10, "platforms": platforms}).json()
    assert [x["image_id"] for x in body["results"]] == ids[:10]
    np.testing.assert_allclose([x["score"] for x in body["results"]], scores[:10], atol=1e-4)
    assert {x["platform"] for x in body["results"]} == set(platforms)
    assert body["platforms"] == sorted(platforms) and not body["degraded"]
    places = served.search({"query": QUERY, "k": 4, "platforms": platforms, "group_by": "location"}).json()
    assert [x["image_id"] for x in places["results"]] == _places(ids, scores, run.frame)[0][:4]


def test_offset_pages_through_the_ranking(served):
    run = served.run
    ids, _ = offline_top(run, run.build_a, QUERY, 24)
    pages = [served.search({"query": QUERY, "k": 5, "offset": o}).json()["results"] for o in (0, 5, 10, 20)]
    assert [x["image_id"] for page in pages[:3] for x in page] == ids[:15]
    assert [x["rank"] for x in pages[1]] == [6, 7, 8, 9, 10]
    assert [x["image_id"] for x in pages[3]] == ids[20:]  # 4 left of 24
    assert served.search({"query": QUERY, "offset": 30}).json()["results"] == []
    place_ids = _places(ids, offline_top(run, run.build_a, QUERY, 24)[1], run.frame)[0]
    page = served.search({"query": QUERY, "k": 3, "offset": 3, "group_by": "location"}).json()["results"]
    assert [x["image_id"] for x in page] == place_ids[3:6] and [x["rank"] for x in page] == [4, 5, 6]


def test_healthz_and_openapi(served):
    health = requests.get(served.url + "/healthz", timeout=30).json()
    assert health["status"] == "ok" and health["index_build"] == served.run.build_a
    assert {"QueryEncoder", "ExpertHead_drone", "IndexShard_0", "IndexShard_1"} <= set(health["components"])
    spec = requests.get(served.url + "/openapi.json", timeout=30).json()
    assert spec["openapi"].startswith("3.") and {"/search", "/healthz", "/thumbnail"} <= set(spec["paths"])
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(spec)


# ----- input limits: always a 4xx JSON error, never a 5xx -------------------------------------------------------
BAD_BODIES = [
    ("empty query", {"query": ""}, 422),
    ("whitespace query", {"query": " \t\n "}, 422),
    ("control characters only", {"query": "\u0000\u0007"}, 422),
    ("oversized query", {"query": "x" * 1001}, 422),
    ("query not a string", {"query": 42}, 422),
    ("query null", {"query": None}, 422),
    ("missing query", {"k": 3}, 422),
    ("k zero", {"query": "roof", "k": 0}, 422),
    ("k too large", {"query": "roof", "k": 101}, 422),
    ("k a string", {"query": "roof", "k": "5"}, 422),
    ("k a float", {"query": "roof", "k": 2.5}, 422),
    ("k a bool", {"query": "roof", "k": True}, 422),
    ("unknown field", {"query": "roof", "top_k": 5}, 422),
    ("body a list", ["roof"], 422),
    ("lone surrogate", {"query": "roof \ud800"}, 422),
    ("group_by unknown", {"query": "roof", "group_by": "city"}, 422),
    ("platforms empty", {"query": "roof", "platforms": []}, 422),
    ("platforms unknown", {"query": "roof", "platforms": ["drone", "plane"]}, 422),
    ("platforms a string", {"query": "roof", "platforms": "drone"}, 422),
    ("offset negative", {"query": "roof", "offset": -1}, 422),
    ("offset a string", {"query": "roof", "offset": "2"}, 422),
    ("offset too deep", {"query": "roof", "offset": 10_001}, 422),
]


@pytest.mark.parametrize("name,body,status", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_json_bodies_are_4xx_json(served, name, body, status):
    data = json.dumps(body).encode()  # json.dumps keeps a lone surrogate as \ud800
    r = requests.post(served.url + "/search", data=data, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["error"] and r.json()["detail"]


RAW_BODIES = [
    ("not json", b"query=roof", "application/json", 400),
    ("truncated json", b'{"query": "roof"', "application/json", 400),
    ("bad utf-8", b'{"query": "\xff\xfe roof"}', "application/json", 400),
    ("empty body", b"", "application/json", 422),
    ("text/plain", b'{"query": "roof"}', "text/plain", 422),
    ("too large", b'{"query": "' + b"a" * 70_000 + b'"}', "application/json", 413),
]


@pytest.mark.parametrize("name,data,ctype,status", RAW_BODIES, ids=[b[0] for b in RAW_BODIES])
def test_malformed_bodies_are_4xx_json(served, name, data, ctype, status):
    r = requests.post(served.url + "/search", data=data, headers={"Content-Type": ctype}, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["error"] and r.json()["detail"]


def test_routing_errors_are_json(served):
    for method, path, status in (("GET", "/search", 405), ("GET", "/nope", 404), ("DELETE", "/healthz", 405)):
        r = requests.request(method, served.url + path, timeout=30)
        assert r.status_code == status and r.json()["error"], (method, path, r.text)


def test_query_is_cleaned_before_encoding(served):
    body = served.search({"query": "  a  red\u00a0roof\n"}).json()
    assert body["query"] == "a red roof"


# ----- API key ------------------------------------------------------------------------------------------------------
def test_api_key_on_and_off(served):
    ingress = _handle("SearchIngress")
    ingress.reconfigure.remote({"api_key": "s3cret"}).result()
    key = {"X-API-Key": "s3cret"}
    try:
        for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": ""}):
            r = served.search({"query": "roof"}, headers=headers)
            assert r.status_code == 401 and r.json()["error"] == "unauthorized", r.text
        assert served.search({"query": "roof"}, headers=key).status_code == 200
        # 401 before validation: a bad body without the key learns nothing about the body
        for data in (b'{"query": 42}', b"not json", b'{"query": "' + b"a" * 70_000 + b'"}'):
            r = requests.post(served.url + "/search", data=data, headers={"Content-Type": "application/json"},
                              timeout=30)
            assert r.status_code == 401 and r.json()["error"] == "unauthorized", r.text
        assert served.search({"query": 42}, headers=key).status_code == 422
        image_id = served.run.frame["image_id"][0]
        assert requests.get(served.url + "/thumbnail", params={"id": image_id}, timeout=30).status_code == 401
        health = requests.get(served.url + "/healthz", timeout=30)  # probes need no key, but get no details
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        detailed = requests.get(served.url + "/healthz", headers=key, timeout=30).json()
        assert detailed["status"] == "ok" and "IndexShard_0" in detailed["components"] and detailed["model_version"]
        for path in ("/openapi.json", "/docs"):  # docs: key (the default) -> the key is needed once one is set
            assert requests.get(served.url + path, timeout=30).status_code == 401, path
            assert requests.get(served.url + path, headers=key, timeout=30).status_code == 200, path
        assert requests.get(served.url + "/", timeout=30).status_code == 200
    finally:
        ingress.reconfigure.remote({"api_key": None}).result()
    assert served.search({"query": "roof"}).status_code == 200


# ----- thumbnails -----------------------------------------------------------------------------------------------------
def test_thumbnail_by_id(served):
    from PIL import Image

    image_id = served.run.frame["image_id"][3]
    r = requests.get(served.url + "/thumbnail", params={"id": image_id}, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    img = Image.open(io.BytesIO(r.content))
    assert img.format == "JPEG" and max(img.size) <= 160


def test_thumbnail_path_traversal_is_404(served):
    real = served.run.frame["image_id"][0]
    attempts = ["../../etc/passwd", "/etc/passwd", "file:///etc/passwd", "..%2F..%2Fetc%2Fpasswd",
                f"{real}/../../../../etc/passwd", "../" * 12 + "etc/passwd", served.run.frame["image_uri"][0],
                served.run.frame["image_id"][25]]  # in the gallery of build B only: not served now
    for attempt in attempts:
        r = requests.get(served.url + "/thumbnail", params={"id": attempt}, timeout=30)
        assert r.status_code == 404 and r.json()["error"] == "not_found", (attempt, r.text)
    for raw in ("/thumbnail?id=%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/thumbnail?id=%252e%252e%252fetc%252fpasswd",
                "/thumbnail/../../etc/passwd", "/thumbnail/%2e%2e/%2e%2e/etc/passwd", "/..%2f..%2fetc%2fpasswd"):
        r = requests.get(served.url + raw, timeout=30)
        assert r.status_code == 404 and r.json()["error"], (raw, r.text)
    assert requests.get(served.url + "/thumbnail", timeout=30).status_code == 422  # no id


# ----- degradation -------------------------------------------------------------------------------------------------
def test_a_failing_expert_degrades_the_answer(served):
    query = "a tall building with a red roof next to a parking lot"
    expert = _handle("ExpertHead_drone")
    expert.reconfigure.remote({"fail": True}).result()
    try:
        r = served.search({"query": query, "k": 8})
    finally:
        expert.reconfigure.remote({"fail": False}).result()
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["degraded"] is True and body["failed_experts"] == ["drone"] and body["failed_shards"] == []
    assert body["weights_used"]["drone"] == 0 and sum(body["weights_used"].values()) == pytest.approx(1)
    ids, scores = offline_top(served.run, served.run.build_a, query, 8, drop="drone")
    assert [x["image_id"] for x in body["results"]] == ids
    np.testing.assert_allclose([x["score"] for x in body["results"]], scores, atol=1e-4)
    assert served.search({"query": query}).json()["degraded"] is False


def test_a_killed_expert_replica_degrades_then_recovers(served):
    import ray

    name = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if "ExpertHead_ground" in a["name"])
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    for _ in range(2):  # the first waits for the timeout and marks the expert down; the next leave it out
        r = served.search({"query": "a roof"})
        assert r.status_code == 200, r.text
        assert r.json()["failed_experts"] in ([], ["ground"])  # [] once Serve has restarted it
    deadline = time.time() + 120
    while time.time() < deadline and served.search({"query": "a roof"}).json()["degraded"]:
        time.sleep(1)
    assert served.search({"query": "a roof"}).json()["degraded"] is False  # Serve restarted the replica
    assert requests.get(served.url + "/healthz", timeout=30).json()["down"] == []


# ----- fuzzing the OpenAPI contract ------------------------------------------------------------------------------
def test_schemathesis_finds_no_server_error(served):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error

    schema = schemathesis.openapi.from_url(served.url + "/openapi.json")
    cases = schema.as_strategy(schemathesis.GenerationMode.POSITIVE) | schema.as_strategy(
        schemathesis.GenerationMode.NEGATIVE)
    seen: list[int] = []

    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def check(case):
        response = case.call_and_validate(base_url=served.url, checks=[not_a_server_error], timeout=30)
        seen.append(response.status_code)

    check()
    assert seen and all(code < 500 for code in seen)


# ----- the search page in headless Chromium ------------------------------------------------------------------------
def _chrome(tmp_path):
    import shutil

    binary, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (binary and driver):
        if os.environ.get("GEOLOC_REQUIRE_BROWSER") == "1":
            pytest.fail("GEOLOC_REQUIRE_BROWSER=1 but chromium / chromedriver are not installed")
        pytest.skip("chromium + chromedriver not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1000", f"--user-data-dir={tmp_path / 'chrome'}"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=opts)


def _check_map(browser, served) -> None:
    """One SVG point per result place with coordinates; hovering or clicking one marks that place's cards."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    cards = browser.find_elements(By.CSS_SELECTOR, "#results .card")
    frame = served.run.frame.set_index("image_id")
    with_coords = {c.get_attribute("data-location") for c in cards
                   if not np.isnan(frame.loc[c.get_attribute("data-image-id"), "lat"])}
    points = browser.find_elements(By.CSS_SELECTOR, "#map svg circle.point")
    assert browser.find_element(By.ID, "map").is_displayed()
    assert sorted(p.get_attribute("data-location") for p in points) == sorted(with_coords)
    assert browser.execute_script("return document.querySelectorAll('#map image, #map iframe').length") == 0
    point = points[-1]  # drawn last: the best place, on top
    place = point.get_attribute("data-location")
    ActionChains(browser).move_to_element(point).perform()
    marked = {c.get_attribute("data-image-id") for c in cards if "hl" in c.get_attribute("class").split()}
    assert marked and marked == {c.get_attribute("data-image-id") for c in cards
                                 if c.get_attribute("data-location") == place}
    ActionChains(browser).move_to_element(browser.find_element(By.ID, "query")).perform()
    assert not [c for c in cards if "hl" in c.get_attribute("class").split()]
    point.click()  # pins the place: its cards stay marked after the pointer leaves
    ActionChains(browser).move_to_element(browser.find_element(By.ID, "query")).perform()
    pinned = [c.get_attribute("data-location") for c in cards if "pinned" in c.get_attribute("class").split()]
    assert pinned and set(pinned) == {place}
    card = next(c for c in cards if c.get_attribute("data-location") == place)
    ActionChains(browser).move_to_element(card).perform()  # and a card marks its point
    assert "hl" in point.get_attribute("class").split()


def test_search_page_in_headless_chromium(served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _chrome(tmp_path)
    try:
        browser.get(served.url + "/")
        wait = WebDriverWait(browser, 60)
        browser.find_element(By.ID, "query").send_keys("a tall building with a red roof next to a parking lot")
        browser.find_element(By.ID, "search").click()
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#results .card")) == 10)
        wait.until(lambda b: all(b.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0",
                                                  img) for img in b.find_elements(By.CSS_SELECTOR, ".card img")))
        cards = browser.find_elements(By.CSS_SELECTOR, "#results .card")
        for card in cards:
            assert card.find_element(By.CLASS_NAME, "platform").text in PLATFORMS
            assert "location" in card.find_element(By.CLASS_NAME, "location").text
            float(card.find_element(By.CLASS_NAME, "score").text)
        rows = browser.find_elements(By.CSS_SELECTOR, "#gaterows .gaterow")
        assert [r.get_attribute("data-platform") for r in rows] == PLATFORMS
        assert all(r.find_element(By.CLASS_NAME, "value").text.endswith("%") for r in rows)
        assert "results in" in browser.find_element(By.ID, "status").text
        _check_map(browser, served)
        browser.save_screenshot(str(tmp_path / "search_page.png"))
        browser.find_element(By.ID, "places").click()  # one image per place
        browser.find_element(By.ID, "search").click()
        wait.until(lambda b: "places in" in b.find_element(By.ID, "status").text)
        locations = [c.get_attribute("data-location") for c in browser.find_elements(By.CSS_SELECTOR, "#results .card")]
        assert len(locations) == 8 == len(set(locations))  # build A holds 8 places
        _check_map(browser, served)
        browser.find_element(By.ID, "places").click()
        browser.find_element(By.ID, "query").clear()
        browser.find_element(By.ID, "query").send_keys("x" * 1000)
        browser.execute_script("document.getElementById('query').value += 'y';")  # past maxlength
        browser.find_element(By.ID, "search").click()
        wait.until(ec.visibility_of_element_located((By.ID, "error")))
        assert "Please check the query" in browser.find_element(By.ID, "error").text
        browser.save_screenshot(str(tmp_path / "search_page_error.png"))
    finally:
        browser.quit()
    if os.environ.get("GEOLOC_SCREENSHOT_DIR"):  # keep the screenshots for a look
        import shutil

        for name in ("search_page.png", "search_page_error.png"):
            shutil.copy(tmp_path / name, os.environ["GEOLOC_SCREENSHOT_DIR"])


# ----- serve run serve_config.yaml after make demo -----------------------------------------------------------------
def test_serve_config_yaml_builds_the_app_of_a_demo_run_unedited(served, tmp_path, monkeypatch):
    """What `serve run serve_config.yaml` does from the repo root once `make demo` wrote artifacts/demo: the file's
    own args (relative artifacts path and all) build the graph of that run, shards and experts included."""
    import yaml
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from geoloc_ray.serve.app import build_app

    (tmp_path / "artifacts").mkdir()
    (tmp_path / "artifacts" / "demo").symlink_to(served.run.artifacts, target_is_directory=True)
    monkeypatch.chdir(tmp_path)  # the repo root of a fresh clone, as far as paths go
    raw = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    args = raw["applications"][0]["args"]
    app = call_user_app_builder_with_args_if_necessary(build_app, args)
    ingress = app._bound_deployment
    encoder, experts, shards, app_args = ingress.init_args
    assert sorted(experts) == sorted(PLATFORMS) and len(shards) == served.run.shards
    assert app_args.run_uri() == str(tmp_path / "artifacts" / "demo")
    assert shards[0]._bound_deployment.init_args[4:6] == ({}, served.run.build_b)  # index_build: latest


# ----- zero-downtime index swap (runs last: it changes the served build) ----------------------------------------
def _shard_states(served) -> dict[str, dict]:
    health = requests.get(served.url + "/healthz", timeout=30).json()
    return {n: c for n, c in health["components"].items() if n.startswith("IndexShard_")}


def _shard_actors() -> set[str]:
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "IndexShard_" in a["name"]}


def test_index_hot_swap_in_place_and_refusal(served):
    run = served.run
    before = _shard_actors()
    # Only the shards' user_config changes (args stay the same): Serve reconfigures the running replicas.
    config = app_config(run, run.build_a, expert_timeout_s=5.0, shard_timeout_s=5.0)
    config["applications"][0]["deployments"] = [
        {"name": f"IndexShard_{i}", "user_config": {"index_build": run.build_b}} for i in range(run.shards)]
    deploy(config)
    deadline = time.time() + 60
    while time.time() < deadline and {s["index_build"] for s in _shard_states(served).values()} != {run.build_b}:
        r = served.search({"query": "a roof"})
        assert r.status_code == 200 and not r.json()["degraded"], r.text  # answering all through the swap
        time.sleep(0.2)
    assert {s["index_build"] for s in _shard_states(served).values()} == {run.build_b}
    assert _shard_actors() == before  # the same replicas: reconfigured in place, not replaced
    body = served.search({"query": "a tall building with a red roof next to a parking lot", "k": 30}).json()
    assert body["index_build"] == run.build_b and len(body["results"]) == 30
    ids, _ = offline_top(run, run.build_b, "a tall building with a red roof next to a parking lot", 30)
    assert [x["image_id"] for x in body["results"]] == ids

    config["applications"][0]["deployments"] = [
        {"name": f"IndexShard_{i}", "user_config": {"index_build": run.build_bad}} for i in range(run.shards)]
    deploy(config)
    deadline = time.time() + 60
    while time.time() < deadline and not all(s["refused"] for s in _shard_states(served).values()):
        time.sleep(0.2)
    states = _shard_states(served)
    for s in states.values():
        assert s["index_build"] == run.build_b  # still serving the good build
        assert s["refused"]["index_build"] == run.build_bad and "IndexMismatchError" in s["refused"]["error"]
    assert requests.get(served.url + "/healthz", timeout=30).json()["status"] == "degraded"
    r = served.search({"query": "a roof"})
    assert r.status_code == 200 and r.json()["index_build"] == run.build_b and not r.json()["degraded"]
