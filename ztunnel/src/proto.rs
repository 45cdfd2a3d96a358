//! The generated control-plane messages and gRPC stubs (see `build.rs` and `proto/`).

#![allow(clippy::all, missing_docs)]

pub mod envoy {
    pub mod service {
        pub mod discovery {
            pub mod v3 {
                tonic::include_proto!("envoy.service.discovery.v3");
            }
        }
    }
}

pub mod istio {
    pub mod workload {
        tonic::include_proto!("istio.workload");
    }
    pub mod security {
        tonic::include_proto!("istio.security");
    }
    pub mod ca {
        tonic::include_proto!("istio.v1.auth");
    }
}
