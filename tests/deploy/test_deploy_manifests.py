"""The Kubernetes manifests, validated offline against the dask operator's own CRD schemas.

The CRD YAMLs ship inside dask_kubernetes (``operator/customresources``) as templates: their PodSpec
and ServiceSpec are ``$ref``s to ``python://k8s_crd_resolver/schemata/k8s-1.21.1.json#/definitions/...``
(resolved when the operator's chart is built). Here those refs are resolved against the Kubernetes
API schemas shipped by kubernetes-validate (strict: unknown fields are errors), and the refs to
``templates.yaml`` against the file itself, so the manifests meet the same schema the API server
would enforce. The embedded containers are checked for what a run needs (GPU quantity, the worker
command, mounts), and the job's command line must parse with distlabels' own CLI parser.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")
referencing = pytest.importorskip("referencing")
dask_kubernetes = pytest.importorskip("dask_kubernetes", reason="the CRDs ship with dask-kubernetes (test extra)")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="k8s API schemas (test extra)")
import kubernetes_validate.utils  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = Path(dask_kubernetes.__file__).parent / "operator" / "customresources"
K8S_VERSION = kubernetes_validate.utils.latest_version()     # newest Kubernetes API the package knows
TEMPLATES_URI = "python://dask_kubernetes/operator/customresources/templates.yaml"
K8S_URI = "python://k8s_crd_resolver/schemata/k8s-1.21.1.json"
IMAGE_PREFIX = "/opt/distlabels/"      # where deploy/Dockerfile puts the repository's configs/


def _registry():
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    defs_file = (Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
                 / f"v{K8S_VERSION}-local-strict" / "_definitions.json")
    k8s = json.loads(defs_file.read_text())
    k8s.pop("$id", None)
    k8s["definitions"] = k8s["$defs"]            # the CRDs point into #/definitions/, the defs into #/$defs/
    templates = yaml.safe_load((CRD_DIR / "templates.yaml").read_text())
    return Registry().with_resources([(K8S_URI, Resource(k8s, DRAFT202012)),
                                      (TEMPLATES_URI, Resource(templates, DRAFT202012))])


REGISTRY = None


def validate_crd(doc: dict, crd_file: str) -> None:
    global REGISTRY
    REGISTRY = REGISTRY or _registry()
    crd = yaml.safe_load((CRD_DIR / crd_file).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == doc["apiVersion"].split("/")[1])
    assert doc["apiVersion"] == f"{crd['spec']['group']}/{version['name']}"
    assert doc["kind"] == crd["spec"]["names"]["kind"]
    schema = version["schema"]["openAPIV3Schema"]
    validator = jsonschema.Draft202012Validator(schema, registry=REGISTRY)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10])


def load(rel: str) -> dict:
    return yaml.safe_load((REPO / rel).read_text())


def check_pod(spec: dict, role: str) -> None:
    """What a distlabels pod needs beyond the schema: names, images, mounts that exist, quoted GPUs."""
    volumes = {v["name"] for v in spec.get("volumes", [])}
    for c in spec["containers"]:
        assert c["name"] and c["image"].startswith("distlabels:"), c
        assert all(isinstance(a, str) for a in c.get("args", [])), "every arg must be a string"
        for m in c.get("volumeMounts", []):
            assert m["name"] in volumes and m["mountPath"] == "/data"
        res = c.get("resources", {})
        for kind in ("limits", "requests"):
            for k, v in res.get(kind, {}).items():
                assert isinstance(v, str), f"quote the quantity {k}: {v!r}"
        if role == "worker":
            assert res["limits"]["nvidia.com/gpu"] == "1"
            args = c["args"]
            assert args[:3] == ["dask", "cuda", "worker"]
            assert args[args.index("--resources") + 1] == "GPU=1"
        else:
            assert "nvidia.com/gpu" not in res.get("limits", {})


def test_daskjob_validates_against_the_operator_crd():
    job = load("deploy/k8s/daskjob.yaml")
    validate_crd(job, "daskjob.yaml")
    check_pod(job["spec"]["job"]["spec"], "job")
    check_pod(job["spec"]["cluster"]["spec"]["worker"]["spec"], "worker")
    check_pod(job["spec"]["cluster"]["spec"]["scheduler"]["spec"], "scheduler")
    svc = job["spec"]["cluster"]["spec"]["scheduler"]["service"]
    assert svc["selector"]["dask.org/cluster-name"] == job["metadata"]["name"]


def test_schema_validation_catches_real_mistakes():
    """The validator is not a rubber stamp: a misspelt field and a wrong type are both rejected."""
    job = load("deploy/k8s/daskjob.yaml")
    typo = copy.deepcopy(job)
    typo["spec"]["cluster"]["spec"]["worker"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(AssertionError, match="resource"):
        validate_crd(typo, "daskjob.yaml")
    wrong = copy.deepcopy(job)
    wrong["spec"]["cluster"]["spec"]["worker"]["replicas"] = "eight"
    with pytest.raises(AssertionError, match="replicas"):
        validate_crd(wrong, "daskjob.yaml")
    no_job = copy.deepcopy(job)
    del no_job["spec"]["job"]
    with pytest.raises(AssertionError, match="job"):
        validate_crd(no_job, "daskjob.yaml")


def test_daskcluster_spec_for_cluster_k8s_validates():
    spec = load("configs/k8s-cluster.yaml")
    validate_crd(spec, "daskcluster.yaml")
    check_pod(spec["spec"]["worker"]["spec"], "worker")
    check_pod(spec["spec"]["scheduler"]["spec"], "scheduler")
    from distlabels.pipeline.cluster import load_k8s_spec

    assert load_k8s_spec(str(REPO / "configs/k8s-cluster.yaml"))["metadata"]["name"] == "distlabels"


def test_storage_claim_is_a_valid_readwritemany_pvc():
    pvc = load("deploy/k8s/storage.yaml")
    kubernetes_validate.validate(pvc, K8S_VERSION, strict=True)
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    job = load("deploy/k8s/daskjob.yaml")
    claims = {v["persistentVolumeClaim"]["claimName"] for v in job["spec"]["job"]["spec"]["volumes"]}
    assert claims == {pvc["metadata"]["name"]}


def test_the_job_command_is_one_the_cli_accepts(monkeypatch):
    """Parse the job pod's args with distlabels' own parser and YAML loader: the run config it makes."""
    from distlabels.cli.main import _apply_yaml, build_parser
    from distlabels.cli.production import run_config

    args = load("deploy/k8s/daskjob.yaml")["spec"]["job"]["spec"]["containers"][0]["args"]
    assert args[:2] == ["distlabels", "fit"]
    argv = [a.replace(IMAGE_PREFIX, f"{REPO}/") for a in args[1:]]   # configs/ live at /opt/distlabels in the image
    ns = build_parser().parse_args(argv)
    assert ns.func.__name__ == "cmd_fit"
    ns = _apply_yaml(ns, ns.parser)
    cfg = run_config(ns)
    assert cfg.cluster == "env" and cfg.device == "cuda" and cfg.task_rows >= 1000 and not cfg.progress
    assert ns.model.startswith("/data/") and ns.spectra.startswith("/data/") and ns.out.startswith("/data/")
    with pytest.raises(SystemExit):                                   # and the parser does reject nonsense
        build_parser().parse_args(["fit", "--device", "tpu"])


TEMPLATE_LINE = re.compile(r"^(?P<indent>\s*)\{\{-? toYaml \.Values\.(?P<path>[\w.]+) \| nindent (?P<n>\d+) \}\}$")


def render_chart(chart: Path, release: str) -> dict:
    """Render the chart's one template: ``{{ .Release.Name }}`` and ``{{- toYaml .Values.X | nindent N }}``
    are the only constructs it uses (anything else fails here)."""
    values = yaml.safe_load((chart / "values.yaml").read_text())
    out = []
    for line in (chart / "templates" / "daskjob.yaml").read_text().splitlines():
        line = line.replace("{{ .Release.Name }}", release)
        m = TEMPLATE_LINE.match(line)
        if m:
            node = values
            for key in m["path"].split("."):
                node = node[key]
            block = yaml.safe_dump(node, sort_keys=False).rstrip("\n")
            out += [" " * int(m["n"]) + b for b in block.splitlines()]
            continue
        assert "{{" not in line, f"unsupported template construct: {line.strip()}"
        out.append(line)
    return yaml.safe_load("\n".join(out))


def test_helm_values_render_the_same_daskjob():
    job = load("deploy/k8s/daskjob.yaml")
    rendered = render_chart(REPO / "deploy/helm/distlabels", job["metadata"]["name"])
    assert rendered == job
    validate_crd(rendered, "daskjob.yaml")
    chart = load("deploy/helm/distlabels/Chart.yaml")
    assert chart["apiVersion"] == "v2" and chart["name"] == "distlabels"


def test_dockerfile_installs_the_gpu_extra_and_the_configs():
    text = (REPO / "deploy/Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+", text, re.M)
    extras = re.search(r'^ARG EXTRAS="([^"]+)"', text, re.M).group(1).split(",")
    assert "gpu" in extras and 'pip install ".[$EXTRAS]"' in text and "COPY configs ./configs" in text
    assert f"WORKDIR {IMAGE_PREFIX.rstrip('/')}" in text
    # The image's torch is the version the Makefile installs for the tests and the demo.
    torch_arg = re.search(r'^ARG TORCH_SPEC="([^"]+)"', text, re.M).group(1)
    make_torch = re.search(r"^TORCH \?= (\S+)", (REPO / "Makefile").read_text(), re.M).group(1)
    assert torch_arg == make_torch and 'pip install "$TORCH_SPEC"' in text
