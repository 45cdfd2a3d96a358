//! Compiles the control-plane protos (delta ADS, Istio's workload and authorization
//! resources, Istio's CA) with protox, in pure Rust: no system `protoc`. Client and
//! server stubs both: ztunnel is the client, the e2e control-plane test server the
//! server.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "envoy/service/discovery/v3/discovery.proto",
        "istio/workload/workload.proto",
        "istio/security/authorization.proto",
        "istio/v1/auth/ca.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed=proto/{p}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        // Maps as BTreeMaps: a workload's service map has one or two entries, which a
        // B-tree holds in one small node, without a hasher.
        .btree_map(".")
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
