"""deploy/kubernetes and the Dockerfile, checked without a cluster and without Docker.

Each deployment (the default, with CURVE, the insecure overlay, and the overlay of
examples/multistage_pipeline.py, a graph of three services) is rendered with
`kubectl kustomize`, where kubectl is installed, and every resource it makes is
validated against the Kubernetes schemas (kubernetes-validate, offline). Then zroute
itself judges what the pods would run: the ConfigMap's config.yaml and each container's
args, with `--check`. The pods run here as processes, their volumes laid out as the
kubelet would mount them: a gateway answers its probes' paths, and the default
deployment and the multistage graph, with the Secrets that docs/DEPLOY.md makes, serve
a request with CURVE, the graph's through each of its services.
The numbers that must agree (grace periods and drains, broker replicas and the lists of
brokers, ports) are compared. What only a cluster can show
(scheduling, DNS, Secrets mounted, rollouts) is not run here: docs/DEPLOY.md says so.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Mapping

import kubernetes_validate
import pytest
import yaml

from tests.http_support import http
from tests.support import REPO_ROOT, Stack, free_port, run_zroute, wait_until
from zroute.loader import load_object
from zroute.services import walk
from zroute_cli.config import load_config, section_of
from zroute_cli.gateway import CUT_GRACE_S

KUBERNETES = REPO_ROOT / "deploy" / "kubernetes"
MULTISTAGE = KUBERNETES / "examples" / "multistage"  # examples/multistage_pipeline.py's
DEPLOYMENTS = {"curve": KUBERNETES, "insecure": KUBERNETES / "insecure", "multistage": MULTISTAGE}
# Each deployment's worker Deployments: the built-in graph's Backend, or one per service.
WORKERS = {"curve": ["zroute-worker"], "insecure": ["zroute-worker"],
           "multistage": ["zroute-worker-backend", "zroute-worker-middle"]}
# The images that add a graph's files to zroute's, by name, and the Dockerfiles that
# build them.
IMAGE_DOCKERFILES = {"zroute-multistage": MULTISTAGE / "Dockerfile"}
# The oldest Kubernetes release the manifests are meant for, and the newest that
# kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.latest_version())
# Components, which the manifests use, came with kustomize 3.7; kubectl 1.21 has 4.0.
MIN_KUSTOMIZE = (4, 0)

def kustomize_problem() -> str | None:
    """Why `kubectl kustomize` cannot render the manifests here, if it cannot."""
    if shutil.which("kubectl") is None:
        return "kubectl is not installed"
    result = subprocess.run(["kubectl", "version", "--client", "-o", "json"],
                            capture_output=True, text=True, timeout=30)
    version = json.loads(result.stdout or "{}").get("kustomizeVersion", "")
    found = re.match(r"v(\d+)\.(\d+)", version)
    if not found or tuple(map(int, found.groups())) < MIN_KUSTOMIZE:
        return f"kubectl's kustomize is {version or 'unknown'}, older than v4 (components)"
    return None


@cache
def render(directory: Path) -> tuple[dict, ...]:
    """The resources that `kubectl kustomize directory` makes."""
    problem = kustomize_problem()
    if problem:
        pytest.skip(f"{problem}: the kustomizations are not rendered")
    result = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return tuple(yaml.safe_load_all(result.stdout))


def resource(resources: tuple[dict, ...], kind: str, name: str) -> dict:
    [found] = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    return found


def container(resources: tuple[dict, ...], kind: str, name: str) -> dict:
    [only] = resource(resources, kind, name)["spec"]["template"]["spec"]["containers"]
    return only


def workloads(resources: tuple[dict, ...]) -> list[dict]:
    return [r for r in resources if r["kind"] in ("Deployment", "StatefulSet")]


def worker_deployments(resources: tuple[dict, ...]) -> list[dict]:
    return [r for r in workloads(resources)
            if r["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"]


def service_class(spec: dict) -> str:
    """The service class that a worker container runs: its --service-class, else the
    built-in graph's Backend."""
    return next((arg.partition("=")[2] for arg in spec["args"]
                 if arg.startswith("--service-class=")), "Backend")


def pod_name(workload: str) -> str:
    """The name that the downward API gives a pod of the Deployment `workload` (a
    worker's --id)."""
    return f"{workload}-5d8f7c9b4-x2k4j"


def image_files(image: str) -> dict[str, Path]:
    """The files that an image adds to zroute's, as its Dockerfile copies them: their
    paths in the image -> the repository's files."""
    path = IMAGE_DOCKERFILES.get(image.partition(":")[0])
    files = {}
    for kind, rest in dockerfile(path) if path else []:
        if kind == "COPY":
            *sources, directory = rest.split()
            assert directory.endswith("/"), f"{path}: COPY into a directory"
            files.update({directory + Path(source).name: REPO_ROOT / source
                          for source in sources})
    return files


def config_text(resources: tuple[dict, ...]) -> str:
    """The config.yaml of the ConfigMap that the pods mount (its name has a hash)."""
    [config_map] = [r for r in resources if r["kind"] == "ConfigMap"
                    and r["metadata"]["name"].startswith("zroute-config-")]
    return config_map["data"]["config.yaml"]


def config(resources: tuple[dict, ...]) -> dict:
    return yaml.safe_load(config_text(resources))


def pod_here(resources: tuple[dict, ...], kind: str, name: str, root: Path,
             secrets: Mapping[str, Mapping[str, bytes]] | None = None) -> list[str]:
    """The command line of a workload's container, run here with its volumes laid out
    under `root` as the kubelet mounts them: the ConfigMap's config.yaml, each Secret
    (name -> {file: content}; none given: empty), each emptyDir; and the files that its
    image adds to zroute's. The args name those paths, and $(VAR) from the downward API's
    metadata.name is pod_name(name)."""
    pod = resource(resources, kind, name)["spec"]["template"]["spec"]
    [spec] = pod["containers"]
    in_image = image_files(spec["image"])
    for path, source in in_image.items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    for mount in spec["volumeMounts"]:
        volume, target = volumes[mount["name"]], root / mount["mountPath"].lstrip("/")
        if "configMap" in volume:
            assert mount["subPath"] == "config.yaml"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(config_text(resources))
            continue
        target.mkdir(parents=True)
        if "secret" in volume:
            for file, content in (secrets or {}).get(volume["secret"]["secretName"], {}).items():
                (target / file).write_bytes(content)
                (target / file).chmod(volume["secret"]["defaultMode"])
    values = {env["name"]: pod_name(name) for env in spec.get("env", [])
              if env.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name"}
    laid_out = sorted([*(mount["mountPath"] for mount in spec["volumeMounts"]), *in_image],
                      key=len, reverse=True)

    def here(arg: str) -> str:
        arg = re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], arg)
        path = next((path for path in laid_out if path in arg), None)
        return arg.replace(path, f"{root}{path}", 1) if path else arg

    return [here(arg) for arg in spec["args"]]


def manifest_files() -> list[Path]:
    return sorted(KUBERNETES.rglob("*.yaml"))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(KUBERNETES)))
def test_every_manifest_file_parses_and_its_resources_are_valid(path: Path):
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert documents, f"{path} holds nothing"
    if path.name == "kustomization.yaml":  # or a component's
        assert documents[0]["apiVersion"].startswith("kustomize.config.k8s.io/")
    elif path.name != "config.yaml":  # zroute's: the tests below run zroute on it
        for document in documents:
            for version in KUBERNETES_VERSIONS:
                kubernetes_validate.validate(document, version, strict=True)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("deployment", DEPLOYMENTS)
def test_each_deployment_renders_to_resources_valid_for_kubernetes(deployment: str):
    resources = render(DEPLOYMENTS[deployment])
    kinds = sorted(f"{r['kind']}/{r['metadata']['name']}" for r in resources)
    policies = ["NetworkPolicy/zroute-broker"] if deployment == "insecure" else []
    assert [kind for kind in kinds if not kind.startswith("ConfigMap/")] == [
        "Deployment/zroute-gateway", *(f"Deployment/{name}" for name in WORKERS[deployment]),
        *policies, "PodDisruptionBudget/zroute-broker", "PodDisruptionBudget/zroute-gateway",
        "Service/zroute-broker", "Service/zroute-gateway", "StatefulSet/zroute-broker"]
    for document in resources:
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(document, version, strict=True)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("deployment", DEPLOYMENTS)
def test_zroute_accepts_the_config_and_every_container_s_command_line(deployment, tmp_path):
    resources = render(DEPLOYMENTS[deployment])
    for workload in workloads(resources):
        [spec] = workload["spec"]["template"]["spec"]["containers"]
        assert "command" not in spec, "the image's entry point, zroute, runs the args"
        name = workload["metadata"]["name"]
        result = run_zroute(*pod_here(resources, workload["kind"], name, tmp_path / name),
                            "--check")
        assert (result.returncode, result.stdout) == (
            0, f"zroute {spec['args'][0]}: the configuration is valid\n"), \
            f"{workload['metadata']['name']}: {result.stderr}"


@pytest.mark.timeout(60)
def test_the_base_alone_is_refused_by_the_broker_until_an_overlay_says_how_peers_get_in(
        tmp_path):
    resources = render(KUBERNETES / "base")
    result = run_zroute(*pod_here(resources, "StatefulSet", "zroute-broker", tmp_path), "--check")
    assert result.returncode == 2
    assert "can be reached from other hosts, and the broker has no CURVE keys" in result.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("deployment", DEPLOYMENTS)
def test_every_broker_the_peers_are_given_is_a_replica_of_the_statefulset(deployment):
    resources = render(DEPLOYMENTS[deployment])
    broker = config(resources)["Broker"]
    statefulset = resource(resources, "StatefulSet", "zroute-broker")
    service = resource(resources, "Service", "zroute-broker")
    assert statefulset["spec"]["serviceName"] == "zroute-broker"
    assert service["spec"]["clusterIP"] == "None"  # a DNS name per pod
    ports = {port["name"]: port["port"] for port in service["spec"]["ports"]}
    container_ports = {port["name"]: port["containerPort"]
                       for port in container(resources, "StatefulSet", "zroute-broker")["ports"]}
    assert container_ports == ports
    for key, listens, port in (("frontends", "frontend", ports["clients"]),
                               ("backends", "backend", ports["workers"])):
        assert broker[listens] == f"tcp://0.0.0.0:{port}"
        assert broker[key] == [f"tcp://zroute-broker-{index}.zroute-broker:{port}"
                               for index in range(statefulset["spec"]["replicas"])]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("deployment", DEPLOYMENTS)
def test_each_grace_period_outlasts_the_drain_that_sigterm_starts(deployment):
    resources = render(DEPLOYMENTS[deployment])
    settings = config(resources)

    def grace(name: str) -> int:
        return resource(resources, "Deployment", name)["spec"]["template"]["spec"][
            "terminationGracePeriodSeconds"]

    # A worker drains, then says DISCONNECT and closes: a few seconds at most. Each drains
    # for its own service's drain_timeout.
    for worker in worker_deployments(resources):
        name = worker["metadata"]["name"]
        service = service_class(container(resources, "Deployment", name))
        assert grace(name) >= settings[service]["drain_timeout"] + 5, name
    gateway = container(resources, "Deployment", "zroute-gateway")
    sleep, seconds = gateway["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep == "sleep"
    assert grace("zroute-gateway") > (int(seconds) + settings["Frontend"]["drain_timeout"]
                                      + CUT_GRACE_S)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("deployment", DEPLOYMENTS)
def test_every_worker_is_ready_while_its_ready_file_exists(deployment):
    resources = render(DEPLOYMENTS[deployment])
    for worker in worker_deployments(resources):
        spec = container(resources, "Deployment", worker["metadata"]["name"])
        [ready_file] = [arg.partition("=")[2] for arg in spec["args"]
                        if arg.startswith("--ready-file=")]
        assert spec["readinessProbe"]["exec"]["command"] == ["test", "-e", ready_file]
        assert any(ready_file.startswith(mount["mountPath"] + "/")
                   for mount in spec["volumeMounts"]), \
            "the root file system is read-only: the ready file needs a volume"
        assert "--id=$(POD_NAME)" in spec["args"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("deployment", ["curve", "multistage"])
def test_every_key_file_the_curve_args_name_is_in_a_mounted_secret(deployment):
    resources = render(DEPLOYMENTS[deployment])
    for workload in workloads(resources):
        pod = workload["spec"]["template"]["spec"]
        [spec] = pod["containers"]
        secrets = {volume["name"] for volume in pod["volumes"] if "secret" in volume}
        mounts = {mount["mountPath"]: mount["name"] for mount in spec["volumeMounts"]}
        paths = [arg.partition("=")[2] for arg in spec["args"]
                 if ".curve_" in arg or arg.startswith("--key=")]
        assert paths, workload["metadata"]["name"]
        for path in paths:  # a key file in a mounted directory, or an allowlist directory
            mount = mounts.get(path) or mounts.get(str(Path(path).parent))
            assert mount in secrets, f"{workload['metadata']['name']}: {path} is in no Secret"


@pytest.mark.timeout(60)
def test_every_pod_of_the_multistage_graph_loads_it_from_the_files_its_image_adds():
    resources = render(DEPLOYMENTS["multistage"])
    # The image is zroute's at this version, with the graph's files, and so is its tag.
    version = yaml.safe_load((KUBERNETES / "base" / "kustomization.yaml").read_text())[
        "images"][0]["newTag"]
    [base] = [rest for kind, rest in dockerfile(IMAGE_DOCKERFILES["zroute-multistage"])
              if kind == "FROM"]
    assert base == f"zroute:{version}"
    for workload in workloads(resources):
        spec = workload["spec"]["template"]["spec"]["containers"][0]
        assert spec["image"] == f"zroute-multistage:{version}"
        [graph] = [arg.partition("=")[2] for arg in spec["args"] if arg.startswith("--graph=")]
        assert graph.rpartition(":")[0] in image_files(spec["image"]), workload["metadata"]["name"]


@pytest.mark.timeout(60)
def test_each_service_of_the_multistage_graph_has_a_worker_deployment_of_its_own(tmp_path):
    """One per class with endpoints, its pods its own (selectors apart), as many as the
    class's ServiceArgs.workers in the rendered config."""
    resources = render(DEPLOYMENTS["multistage"])
    gateway = container(resources, "Deployment", "zroute-gateway")
    [graph_spec] = [arg.partition("=")[2] for arg in gateway["args"]
                    if arg.startswith("--graph=")]
    path, _, root = graph_spec.rpartition(":")
    graph = walk(load_object(f"{image_files(gateway['image'])[path]}:{root}", "--graph"))
    config_file = tmp_path / "config.yaml"
    config_file.write_text(config_text(resources))
    settings = load_config(str(config_file), [], graph)
    deployments = {service_class(workload["spec"]["template"]["spec"]["containers"][0]): workload
                   for workload in worker_deployments(resources)}
    assert sorted(deployments) == sorted(service.name for service in graph.worker_services)
    selectors = [tuple(sorted(workload["spec"]["selector"]["matchLabels"].items()))
                 for workload in deployments.values()]
    assert len(set(selectors)) == len(selectors)
    for name, workload in deployments.items():
        assert workload["spec"]["replicas"] == section_of(
            settings, graph.service(name)).service_args.workers, name


@pytest.mark.timeout(60)
def test_without_curve_the_brokers_ports_admit_the_gateways_and_the_workers_alone():
    resources = render(DEPLOYMENTS["insecure"])
    policy = resource(resources, "NetworkPolicy", "zroute-broker")["spec"]
    broker = resource(resources, "StatefulSet", "zroute-broker")["spec"]["template"]
    assert policy["podSelector"]["matchLabels"] == broker["metadata"]["labels"]
    ports = {port["name"]: port["port"]
             for port in resource(resources, "Service", "zroute-broker")["spec"]["ports"]}
    admitted = {(rule["ports"][0]["port"], tuple(sorted(source["podSelector"]["matchLabels"].items())))
                for rule in policy["ingress"] for source in rule["from"]}

    def labels(name: str) -> tuple:
        pod = resource(resources, "Deployment", name)["spec"]["template"]["metadata"]
        return tuple(sorted(pod["labels"].items()))

    assert admitted == {(ports["clients"], labels("zroute-gateway")),
                        (ports["workers"], labels("zroute-worker"))}


@pytest.mark.timeout(60)
def test_prometheus_scrapes_the_gateway_s_metrics_on_its_operators_port():
    resources = render(DEPLOYMENTS["curve"])
    annotations = resource(resources, "Deployment", "zroute-gateway")["spec"]["template"][
        "metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/path": "/metrics",
                           "prometheus.io/port": str(config(resources)["Frontend"]["admin_port"])}


@pytest.mark.timeout(60)
def test_a_gateway_run_from_the_manifests_answers_its_probes_paths(stack: Stack, tmp_path):
    """Readiness is 503 without a broker, and liveness 200: a restart would not help."""
    resources = render(DEPLOYMENTS["insecure"])
    settings = config(resources)["Frontend"]
    spec = container(resources, "Deployment", "zroute-gateway")
    container_ports = {port["name"]: port["containerPort"] for port in spec["ports"]}
    assert container_ports == {"http": settings["port"], "admin": settings["admin_port"]}
    service = resource(resources, "Service", "zroute-gateway")
    assert [port["targetPort"] for port in service["spec"]["ports"]] == ["http"]
    # Here: on loopback, free ports, and no broker.
    ports = {settings["port"]: free_port(), settings["admin_port"]: free_port()}
    gateway = stack.start("gateway", *pod_here(resources, "Deployment", "zroute-gateway", tmp_path),
                          *gateway_here(loopback_brokers(stack, 1), ports[settings["port"]],
                                        ports[settings["admin_port"]]))

    def answer(probe: str) -> int | None:
        assert gateway.alive, gateway.output()
        get = spec[probe]["httpGet"]
        reply = http("GET", f"http://127.0.0.1:{ports[container_ports[get['port']]]}{get['path']}")
        return reply and reply.status

    assert wait_until(lambda: answer("readinessProbe"), 15, "the gateway's /health") == 503
    assert answer("livenessProbe") == 200


Brokers = list[tuple[str, str]]  # each broker's client and worker endpoints


def loopback_brokers(stack: Stack, count: int) -> Brokers:
    """The endpoints of `count` brokers on loopback: the stack's, then free ports."""
    return [(stack.frontend, stack.backend),
            *((f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}")
              for _ in range(count - 1))]


def on_loopback(brokers: Brokers, index: int = 0) -> list[str]:
    """Overrides that put the pods' network on loopback: the peers connect to every broker
    of `brokers`, and a broker's pod binds the endpoints of the broker `index`."""
    frontend, backend = brokers[index]
    return [f"--Broker.frontend={frontend}", f"--Broker.backend={backend}",
            f"--Broker.frontends={json.dumps([client for client, _ in brokers])}",
            f"--Broker.backends={json.dumps([worker for _, worker in brokers])}"]


def gateway_here(brokers: Brokers, port: int, admin_port: int) -> list[str]:
    return [*on_loopback(brokers), "--Frontend.host=127.0.0.1", "--Frontend.admin_host=127.0.0.1",
            f"--Frontend.port={port}", f"--Frontend.admin_port={admin_port}"]


def secrets_from_the_docs(directory: Path) -> dict[str, dict[str, bytes]]:
    """The Secrets that docs/DEPLOY.md's commands make, run in `directory`: its `zroute
    keys` lines, then its `kubectl create secret generic NAME --from-file=...` lines read
    as kubectl reads them (a directory gives each of its files)."""
    docs = (REPO_ROOT / "docs" / "DEPLOY.md").read_text()
    section = docs[docs.index("\n## Kubernetes\n"):]
    for command in re.findall(r"^zroute (keys [^#\n]*?)\s*(?:#.*)?$", section, re.M):
        result = run_zroute(*command.split(), cwd=directory)
        assert result.returncode == 0, result.stderr
    secrets: dict[str, dict[str, bytes]] = {}
    for name, source in re.findall(r"^kubectl create secret generic (\S+) --from-file=(\S+)$",
                                   section, re.M):
        key, _, path = source.rpartition("=")
        path = directory / path
        files = sorted(path.iterdir()) if path.is_dir() else [path]
        secrets.setdefault(name, {}).update(
            {(key or file.name): file.read_bytes() for file in files})
    return secrets


def run_here(stack: Stack, resources: tuple[dict, ...], root: Path,
             secrets: Mapping[str, Mapping[str, bytes]], *worker_overrides: str) -> int:
    """Every workload of a deployment as its pods run, on loopback, with the keys where
    the Secrets are mounted: each broker of the StatefulSet, one pod of each worker
    Deployment (with `worker_overrides`) and a gateway. Returns the gateway's port once
    every worker has written the file its readiness probe tests and the gateway's
    /health says 200."""
    replicas = resource(resources, "StatefulSet", "zroute-broker")["spec"]["replicas"]
    brokers = loopback_brokers(stack, replicas)
    for index in range(replicas):
        stack.start(f"broker-{index}", *pod_here(resources, "StatefulSet", "zroute-broker",
                                                 root / f"broker-{index}", secrets),
                    *on_loopback(brokers, index))
    ready_files = []
    for worker in worker_deployments(resources):
        name = worker["metadata"]["name"]
        stack.start(name, *pod_here(resources, "Deployment", name, root / name, secrets),
                    *on_loopback(brokers), *worker_overrides)
        probe = container(resources, "Deployment", name)["readinessProbe"]["exec"]
        ready_files.append(root / name / probe["command"][-1].lstrip("/"))
    port = free_port()
    stack.start("gateway", *pod_here(resources, "Deployment", "zroute-gateway",
                                     root / "gateway", secrets),
                *gateway_here(brokers, port, free_port()))

    def workers_ready() -> bool:
        for proc in stack.procs:  # one that has stopped says why
            assert proc.alive, f"{proc.name}: {proc.output()}"
        return all(map(Path.exists, ready_files))

    wait_until(workers_ready, 20, "the workers' ready files")
    assert wait_until(lambda: http("GET", f"http://127.0.0.1:{port}/health"), 20,
                      "the gateway").status == 200
    return port


@pytest.mark.timeout(90)
def test_the_curve_deployment_run_here_with_the_docs_secrets_serves_a_request(stack, tmp_path):
    """Every pod as the manifests and docs/DEPLOY.md make it, on loopback: the keys where
    the curve component mounts the Secrets, the worker ready once registered."""
    resources = render(DEPLOYMENTS["curve"])
    port = run_here(stack, resources, tmp_path, secrets_from_the_docs(tmp_path),
                    "--Backend.sleep_time=0")
    reply = http("POST", f"http://127.0.0.1:{port}/generate", b'{"text": "pods"}')
    assert (reply.status, reply.body, reply.headers["x-worker-id"]) == (
        200, b"Hello pods!\n", pod_name("zroute-worker"))
    assert all("with CURVE" in proc.output() for proc in stack.procs
               if proc.name.startswith("broker-"))


@pytest.mark.timeout(90)
def test_the_multistage_graph_run_here_passes_a_request_through_every_service(stack, tmp_path):
    """The graph's pods, their files where its image has them: the brokers, one worker of
    Middle and one of Backend, the gateway. Middle's worker calls Backend through the
    brokers' client port, with its own key, which the docs' Secrets let in there."""
    resources = render(DEPLOYMENTS["multistage"])
    port = run_here(stack, resources, tmp_path, secrets_from_the_docs(tmp_path),
                    "--Backend.sleep_time=0")
    reply = http("POST", f"http://127.0.0.1:{port}/generate", b'{"text": "pods,nodes"}')
    assert (reply.status, reply.body) == (200, b"1. Hello pods!\n2. Hello nodes!\n")


def dockerfile(path: Path = REPO_ROOT / "Dockerfile") -> list[tuple[str, str]]:
    """A Dockerfile's instructions, (INSTRUCTION, rest), continuation lines joined."""
    text = re.sub(r"\\\n\s*", "", path.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines
            if line and not line.startswith("#")]


def test_the_dockerfile_copies_every_package_and_runs_zroute_as_a_non_root_user():
    instructions = dockerfile()
    assert {rest.split()[0] for kind, rest in instructions if kind == "FROM"} == {
        "python:3.12-slim"}
    copied = [source for kind, rest in instructions if kind == "COPY"
              for source in rest.split()[:-1] if not source.startswith("--")]
    for source in copied:
        assert (REPO_ROOT / source).exists(), f"COPY {source}: no such file"
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 and later
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    packages = {path.parent.name for path in REPO_ROOT.glob("*/__init__.py")
                if any(path.parent.match(pattern)
                       for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"])}
    assert packages <= set(copied), "a package the wheel needs is not copied"
    assert project["project"]["readme"] in copied
    installs = [rest for kind, rest in instructions if kind == "RUN" and "pip " in rest]
    assert installs and not any("[" in rest for rest in installs), "no extras in the image"
    [user] = [rest for kind, rest in instructions if kind == "USER"]
    assert user.split(":")[0] not in ("0", "root")
    assert ("ENTRYPOINT", '["zroute"]') in instructions
    # The manifests run the image as that user, at the tag of this version.
    resources = yaml.safe_load((KUBERNETES / "base" / "kustomization.yaml").read_text())
    assert resources["images"] == [{"name": "zroute", "newTag": project["project"]["version"]}]
    for name in ("broker.yaml", "worker/worker.yaml", "gateway.yaml"):
        for document in yaml.safe_load_all((KUBERNETES / "base" / name).read_text()):
            if document["kind"] in ("Deployment", "StatefulSet"):
                pod = document["spec"]["template"]["spec"]
                assert str(pod["securityContext"]["runAsUser"]) == user.split(":")[0]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_dockerfile_s_install_builds_a_working_zroute_from_what_it_copies(tmp_path):
    """The wheel stage's `pip wheel .` from the copied files alone, then the image
    stage's install from those wheels only, in a fresh venv (with this machine's Python,
    not the image's 3.12)."""
    instructions = dockerfile()
    context = tmp_path / "src"
    context.mkdir()
    for kind, rest in instructions:
        if kind == "COPY" and "--from" not in rest:
            *sources, _ = rest.split()
            for source in sources:
                copy = shutil.copytree if (REPO_ROOT / source).is_dir() else shutil.copy
                copy(REPO_ROOT / source, context / source)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    wheels = tmp_path / "wheels"
    subprocess.run([*pip, "wheel", "--no-cache-dir", "--wheel-dir", str(wheels), "."],
                   cwd=context, check=True, timeout=300, capture_output=True)
    subprocess.run([*pip, "install", "--no-cache-dir", "--no-index", "--find-links",
                    str(wheels), "zroute"], check=True, timeout=120, capture_output=True)
    result = subprocess.run([str(venv / "bin" / "zroute"), "worker", "--help"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "--ready-file" in result.stdout, result.stderr
    assert any(venv.glob("lib/python*/site-packages/gateway/static/*")), "no dashboard files"
