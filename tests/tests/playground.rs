//! The playground (issue 14, point 6): a simulated cluster built from a directory of a user's
//! own manifests, what `cargo xtask sim up DIR` runs; and who may remove a simulator: a sweep
//! removes only abandoned sims (owner process gone), never a live one or a playground, and
//! `sim down` removes a playground also after its `sim up` was killed half-way.
//!
//! Tests here run in parallel threads of one process with other suites' sims around, so they
//! never call the global `sweep()`: they apply the same rule to their own sims only
//! (`sweep_abandoned_where`).

use std::{collections::BTreeMap, fs, path::PathBuf, time::Duration};

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use sluice_tests::{
    leftovers_of,
    playground::{self, spec, Playground, PlaygroundOpts},
    registry::{self, Disposition, OwnerProcess},
    sweep_abandoned_where, workloads, Sim, SimKind, SimOpts, SluiceOpts,
};

/// Every kind the playground builds, in one user's directory (two files, as users split them).
const APP: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {istio-injection: enabled}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: web, namespace: shop}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web, version: v1}}
    spec:
      serviceAccountName: web
      containers:
      - name: web
        image: registry.example/shop/web:2.1
        ports: [{name: http, containerPort: 8080}]
        resources: {requests: {cpu: 10m}}
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db, namespace: shop}
spec:
  serviceName: db
  replicas: 2
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec:
      containers: [{name: db, image: postgres:16, ports: [{containerPort: 5432}]}]
---
apiVersion: apps/v1
kind: ReplicaSet
metadata: {name: cache, namespace: shop}
spec:
  replicas: 1
  selector: {matchLabels: {app: cache}}
  template:
    metadata: {labels: {app: cache}}
    spec:
      containers: [{name: cache, image: redis:7, ports: [{containerPort: 6379}]}]
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: agent, namespace: shop}
spec:
  selector: {matchLabels: {app: agent}}
  template:
    metadata: {labels: {app: agent}}
    spec:
      containers: [{name: agent, image: agent:1, ports: [{containerPort: 9100}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec:
  containers: [{name: sh, image: curlimages/curl, command: [sleep, infinity]}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings, namespace: shop}
data: {mode: fast}
"#;

const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: web-v1, namespace: shop}
spec:
  clusterIP: 10.96.7.7
  selector: {app: web, version: v1}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  selector: {app: db}
  ports: [{name: tcp-pg, port: 5432}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web-to-v1, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
  - backendRefs: [{name: web-v1, port: 80}]
"#;

fn user_dir(files: &[(&str, &str)]) -> Result<PathBuf> {
    let dir =
        std::env::temp_dir().join(format!("sluice-playground-test-{}-{}", std::process::id(), files.len()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    for (name, text) in files {
        fs::write(dir.join(name), text)?;
    }
    Ok(dir)
}

/// `namespace/name` of the pods sluice on `node` enrolled.
fn enrolled(pg: &Playground, node: usize) -> Result<Vec<String>> {
    let pods = pg.sluice(node).get_json("/pods")?;
    Ok(pods
        .as_array()
        .context("/pods is not a list")?
        .iter()
        .map(|p| format!("{}/{}", p["namespace"].as_str().unwrap_or(""), p["name"].as_str().unwrap_or("")))
        .collect())
}

#[test]
fn a_directory_of_manifests_becomes_a_cluster_with_sluice_on_every_node() -> Result<()> {
    let dir = user_dir(&[("app.yaml", APP), ("services.yaml", SERVICES)])?;
    let pg = Playground::from_dir(&dir, PlaygroundOpts { nodes: 2, ..PlaygroundOpts::default() })?;
    let _ = fs::remove_dir_all(&dir);
    eprintln!("{}", pg.summary()?);

    // Pods as the controllers name and label them, spread over both nodes.
    let names: Vec<&str> = pg.pods().iter().map(|p| p.plan.name.as_str()).collect();
    let web: Vec<_> =
        pg.pods().iter().filter(|p| p.plan.labels.get("app").is_some_and(|a| a == "web")).collect();
    ensure!(web.len() == 3, "{names:?}");
    let hash = &web[0].plan.labels["pod-template-hash"];
    for p in &web {
        ensure!(
            p.plan.name.starts_with(&format!("web-{hash}-"))
                && p.plan.name.len() == format!("web-{hash}-").len() + 5,
            "{}",
            p.plan.name
        );
        ensure!(p
            .plan
            .owner
            .as_ref()
            .is_some_and(|o| o.kind == "ReplicaSet" && o.name == format!("web-{hash}")));
    }
    ensure!(names.contains(&"db-0") && names.contains(&"db-1"), "{names:?}");
    ensure!(names.iter().filter(|n| n.starts_with("cache-")).count() == 1, "{names:?}");
    ensure!(names.iter().filter(|n| n.starts_with("agent-")).count() == 2, "one agent per node: {names:?}");
    ensure!(names.contains(&"client"), "{names:?}");
    let per_node: BTreeMap<usize, usize> = pg.pods().iter().fold(BTreeMap::new(), |mut m, p| {
        *m.entry(p.plan.node).or_default() += 1;
        m
    });
    ensure!(per_node.len() == 2 && per_node.values().all(|n| *n >= 4), "spread: {per_node:?}");
    // The pod manifests sluice reads name their controller.
    let web0 =
        fs::read_to_string(pg.sim().manifest_dir().join(format!("pod-shop-{}.yaml", web[0].plan.name)))?;
    ensure!(web0.contains("kind: ReplicaSet") && web0.contains("serviceAccountName: web"), "{web0}");

    // sluice runs on every node and enrolled that node's pods (the namespace's Istio label).
    for node in 0..2 {
        let mine: Vec<String> = pg
            .pods()
            .iter()
            .filter(|p| p.plan.node == node)
            .map(|p| format!("{}/{}", p.plan.namespace, p.plan.name))
            .collect();
        let got = enrolled(&pg, node)?;
        ensure!(mine.iter().all(|p| got.contains(p)), "node {node}: {got:?} lacks some of {mine:?}");
        let out = pg.sluice(node).cli(&["pods"])?;
        ensure!(out.success() && out.stdout.contains("shop"), "{}", out.stderr);
    }

    // The ClusterIP written is kept; the others are allocated around it.
    ensure!(pg.service_addr("shop", "web-v1", 80)?.ip().to_string() == "10.96.7.7");
    let web_vip = pg.service_addr("shop", "web", 80)?;
    ensure!(web_vip.ip().to_string().starts_with("10.96.0."), "{web_vip}");

    // Through sluice: the route passed as written sends web's traffic to web-v1, whose named
    // target port was resolved to the container port the echo stand-in listens on.
    let client = pg.pods().iter().find(|p| p.plan.name == "client").context("client")?;
    let load = workloads::http_load(&client.pod, web_vip, &["--count", "60", "--connections", "3"])?;
    ensure!(load.succeeded == 60, "{load:?}");
    let answering: Vec<&String> = load.by_name.keys().collect();
    ensure!(
        answering.iter().all(|n| n.starts_with("web-")) && answering.len() == 3,
        "every web pod answers: {load:?}"
    );
    let routes = pg.sluice(0).cli(&["routes", "shop/web"])?;
    ensure!(routes.stdout.contains("web-to-v1"), "the HTTPRoute is in force:\n{}", routes.stdout);
    // What `cargo xtask sim exec shop/client -- curl ...` runs (from the state file later
    // commands read): curl in the client pod's cgroup and netns, captured by sluice.
    let st = playground::state::State::of(&pg);
    let curl = ["curl", "-sS", "-m", "10", "-D", "-", &format!("http://{web_vip}/")].map(String::from);
    let out = st.command_in_pod("shop/client", &curl)?.output()?;
    let head = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && head.contains("x-simpod-name: web-"),
        "curl in the pod through sluice: {head}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(st.command_in_pod("shop/web", &curl).is_err(), "three web pods: the name must be exact");
    ensure!(st.find_pod("shop/cache")?.name.starts_with("cache-"), "a ReplicaSet's pod by its name");

    // A StatefulSet pod echoes on its container port too (bytes through sluice, mTLS).
    let db = pg.service_addr("shop", "db", 5432)?;
    let got = workloads::http_load(&client.pod, db, &["--count", "4"])?;
    ensure!(got.succeeded == 4 && got.by_name.keys().all(|n| n.starts_with("db-")), "{got:?}");
    ensure!(pg.manifest_errors()?.is_empty(), "{:?}", pg.manifest_errors()?);
    ensure!(pg.plan().ignored.iter().any(|(o, _)| o.contains("ConfigMap shop/settings")));

    // Configuration changes apply object by object: the route replaced, then deleted.
    let to_web =
        SERVICES.replace("backendRefs: [{name: web-v1, port: 80}]", "backendRefs: [{name: web, port: 80}]");
    let route = to_web.split("---").last().context("route document")?;
    pg.apply("route.yaml", route)?;
    let routes = pg.sluice(1).cli(&["routes", "shop/web"])?;
    ensure!(
        routes.stdout.contains("web-to-v1") && !routes.stdout.contains("web-v1:"),
        "replaced:\n{}",
        routes.stdout
    );
    pg.delete("route.yaml", route)?;
    let routes = pg.sluice(1).cli(&["routes", "shop/web"])?;
    ensure!(
        !routes.stdout.contains("web-to-v1") && routes.stdout.contains("no routes"),
        "deleted:\n{}",
        routes.stdout
    );
    // What sluice rejects is refused with sluice's reason, and nothing lingers.
    let bad = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: bad, namespace: shop}\n\
               spec: {parentRefs: [{group: \"\", kind: Service, name: web}], rules: [{filters: [{type: ExtensionRef}]}]}\n";
    let err = pg.apply("bad.yaml", bad).unwrap_err().to_string();
    ensure!(err.contains("sluice rejected bad.yaml (document 1) HTTPRoute shop/bad"), "{err}");
    ensure!(pg.manifest_errors()?.is_empty(), "{:?}", pg.manifest_errors()?);
    let err = pg
        .apply("more.yaml", "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec: {}\n")
        .unwrap_err();
    ensure!(err.to_string().contains("builds its Deployment once"), "{err}");
    Ok(())
}

#[test]
fn bookinfo_images_get_stand_ins_that_call_each_other() -> Result<()> {
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/bookinfo");
    let sources = spec::read_paths(&[
        examples.join("00-namespace.yaml"),
        examples.join("10-bookinfo.yaml"),
        examples.join("15-curl.yaml"),
    ])?;
    let pg = Playground::up(&sources, PlaygroundOpts { nodes: 2, ..PlaygroundOpts::default() })?;
    let curl = pg.app_pod("bookinfo", "curl")?;
    let page = pg.service_addr("bookinfo", "productpage", 9080)?;
    let out = curl.run_simpod([
        "http-get",
        "--to",
        &page.to_string(),
        "--path",
        "/productpage",
        "--header",
        "cookie: session=jason",
        "--header",
        "x-request-id: playground-1",
        "--header",
        "x-b3-traceid: 80f198ee56343ba864fe8b2a57d3eff7",
        "--header",
        "traceparent: 00-80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-01",
    ])?;
    let v: Value = out.check()?.json()?;
    let body = &v["body"];
    ensure!(v["status"] == 200 && body["user"] == "jason", "{v}");
    ensure!(body["details"]["version"] == "v1", "{body}");
    // What each hop received: productpage's forwarded headers, plus end-user from the session.
    for hop in [&body["details"]["received"], &body["reviews"]["received"]] {
        ensure!(hop["x-request-id"] == "playground-1", "{hop}");
        ensure!(hop["x-b3-traceid"] == "80f198ee56343ba864fe8b2a57d3eff7", "{hop}");
        ensure!(
            hop["traceparent"].as_str().is_some_and(|t| t.contains("80f198ee56343ba864fe8b2a57d3eff7")),
            "{hop}"
        );
        ensure!(hop["cookie"] == "session=jason", "{hop}");
    }
    ensure!(body["reviews"]["received"]["end-user"] == "jason", "{body}");
    // Over many pages, every reviews version answers, and only v2 and v3 show ratings.
    let load = workloads::http_load(
        curl,
        page,
        &[
            "--count",
            "300",
            "--connections",
            "6",
            "--path",
            "/productpage",
            "--tally-header",
            "x-bookinfo-reviews",
            "--tally-header",
            "x-bookinfo-ratings",
        ],
    )?;
    eprintln!("300 pages: {:?}", load.by_header);
    ensure!(load.succeeded == 300, "{load:?}");
    for v in ["v1", "v2", "v3"] {
        ensure!(
            load.header_count("x-bookinfo-reviews", v) > 0,
            "no page from reviews {v}: {:?}",
            load.by_header
        );
    }
    ensure!(
        load.header_count("x-bookinfo-ratings", "none") == load.header_count("x-bookinfo-reviews", "v1"),
        "{:?}",
        load.by_header
    );
    ensure!(
        load.header_count("x-bookinfo-ratings", "v1") == 300 - load.header_count("x-bookinfo-reviews", "v1"),
        "{:?}",
        load.by_header
    );
    Ok(())
}

/// A sim whose owner is gone: its marker now names a process that has exited.
fn orphan(sim: &Sim) -> Result<()> {
    let mut dead = std::process::Command::new("true").spawn()?;
    let pid = dead.id();
    let start_ticks = registry::start_ticks(pid).unwrap_or(1);
    dead.wait()?;
    let mut marker = registry::read(sim.id()).context("the sim has a marker")?;
    marker.owner = OwnerProcess { pid, start_ticks, command: "true".into() };
    registry::update(&marker)
}

#[test]
fn sweeps_remove_abandoned_sims_only_and_sim_down_removes_a_playground() -> Result<()> {
    let live = Sim::new()?;
    live.add_node("n1")?.add_pod("demo", "a", Default::default())?;
    let name = format!("pgtest-{}", std::process::id());
    let kept =
        Sim::with_opts(SimOpts { kind: SimKind::Playground { name: name.clone() }, ..SimOpts::default() })?;
    let kept_node = kept.add_node("n1")?;
    kept_node.add_pod("demo", "b", Default::default())?;
    {
        // A playground's sluice listens on the node's default admin socket, so the CLI finds it
        // with `--node`, as the summary prints it (and as on a real node).
        let sluice = kept_node.start_sluice(SluiceOpts::default())?;
        sluice.wait_ready(Duration::from_secs(30))?;
        let out = std::process::Command::new(sluice_tests::sluice_bin()?)
            .args(["status", "--node", kept_node.name()])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success() && text.contains(&format!("on node {}", kept_node.name())),
            "sluice status --node {}: {text}{}",
            kept_node.name(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let abandoned = Sim::new()?;
    abandoned.add_node("n1")?.add_pod("demo", "c", Default::default())?;
    orphan(&abandoned)?;

    // A second playground cannot take the name.
    let err =
        Sim::with_opts(SimOpts { kind: SimKind::Playground { name: name.clone() }, ..SimOpts::default() })
            .err()
            .context("a second playground of the same name")?;
    ensure!(err.to_string().contains("exists already"), "{err}");

    let ids = [live.id().to_string(), kept.id().to_string(), abandoned.id().to_string()];
    ensure!(matches!(registry::disposition(&ids[0]), Disposition::Live { .. }));
    ensure!(matches!(registry::disposition(&ids[1]), Disposition::Playground { .. }));
    ensure!(matches!(registry::disposition(&ids[2]), Disposition::Abandoned { .. }));
    let summary = sweep_abandoned_where(|id| ids.iter().any(|x| x == id));
    let removed: Vec<&str> = summary.removed.iter().map(|s| s.id.as_str()).collect();
    ensure!(removed == [ids[2].as_str()], "only the abandoned sim goes: {summary:#?}");
    ensure!(summary.kept.len() == 2, "{summary:#?}");
    ensure!(leftovers_of(&ids[2]).is_empty(), "{:#?}", leftovers_of(&ids[2]));
    ensure!(registry::read(&ids[2]).is_none(), "its marker went with it");
    ensure!(!leftovers_of(&ids[0]).is_empty() && !leftovers_of(&ids[1]).is_empty());

    // `sim up` killed half-way: the process is gone without tearing anything down (here: the
    // handle is forgotten, so no Drop runs); `sim down` still removes everything.
    let temp = kept.temp_dir().to_path_buf();
    std::mem::forget(kept);
    let summary = sweep_abandoned_where(|id| id == ids[1]);
    ensure!(summary.removed.is_empty(), "no sweep removes a playground: {summary:#?}");
    let found = playground::down(&name)?;
    ensure!(!found.is_empty());
    ensure!(leftovers_of(&ids[1]).is_empty(), "{:#?}", leftovers_of(&ids[1]));
    ensure!(!temp.exists() && registry::read(&ids[1]).is_none() && registry::playground_id(&name).is_none());
    ensure!(playground::down(&name).is_err(), "gone");
    drop(live);
    ensure!(
        leftovers_of(&ids[0]).is_empty() && registry::read(&ids[0]).is_none(),
        "teardown removes the marker"
    );
    Ok(())
}
