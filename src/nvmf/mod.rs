//! NVMe over Fabrics on TCP: the PDU codec ([`pdu`]).
pub mod pdu;
