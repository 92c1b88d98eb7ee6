//! The rules for what enters the agent from outside, in one place so that the API,
//! the CLI, import files, the config, the journal and etcd entries agree: addresses
//! (`address`), names (`name`) and the files read whole (`file`).

pub mod address;
pub mod file;
pub mod name;

pub use address::{AddressError, parse_device, parse_ip, parse_net};
pub use name::{MAX_NAME_LEN, NameProblem, Spaces, check_name, printable};
