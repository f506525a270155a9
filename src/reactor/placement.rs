//! CPU placement as plain data: which cores get a reactor, parsed from config or flags.

use crate::types::CoreId;

/// Where reactors run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Exactly these cores, one reactor each, in this order.
    Fixed(Vec<CoreId>),
    /// The first `n` CPUs this process may use.
    Count(usize),
}

impl Placement {
    /// Resolves to a list of cores given the CPUs this process may use.
    pub fn resolve(&self, allowed: &[CoreId]) -> Result<Vec<CoreId>, String> {
        match self {
            Placement::Fixed(v) => Ok(v.clone()),
            Placement::Count(n) => {
                if *n == 0 {
                    return Err("reactor count must be at least 1".into());
                }
                if *n > allowed.len() {
                    return Err(format!(
                        "{n} reactors asked for but only {} CPUs are allowed ({})",
                        allowed.len(),
                        format_cpu_list(allowed)
                    ));
                }
                Ok(allowed[..*n].to_vec())
            }
        }
    }
}

/// Parses a CPU list like `0-3,6,8-9` (the kernel's cpulist format).
pub fn parse_cpu_list(s: &str) -> Result<Vec<CoreId>, String> {
    let mut out: Vec<CoreId> = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let a: usize = a
            .parse()
            .map_err(|_| format!("bad CPU number {a:?} in {s:?}"))?;
        let b: usize = b
            .parse()
            .map_err(|_| format!("bad CPU number {b:?} in {s:?}"))?;
        if b < a {
            return Err(format!("descending range {part:?} in {s:?}"));
        }
        if b - a > 4096 {
            return Err(format!("range {part:?} is too large"));
        }
        for c in a..=b {
            if out.contains(&CoreId(c)) {
                return Err(format!("CPU {c} listed twice in {s:?}"));
            }
            out.push(CoreId(c));
        }
    }
    if out.is_empty() {
        return Err("empty CPU list".into());
    }
    Ok(out)
}

/// Formats cores in the kernel's cpulist style (`0-3,6`).
pub fn format_cpu_list(cores: &[CoreId]) -> String {
    let mut v: Vec<usize> = cores.iter().map(|c| c.0).collect();
    v.sort_unstable();
    v.dedup();
    let mut out = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let start = v[i];
        let mut end = start;
        while i + 1 < v.len() && v[i + 1] == end + 1 {
            i += 1;
            end = v[i];
        }
        out.push(if start == end {
            format!("{start}")
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    out.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn cpu_lists() {
        let v = parse_cpu_list("0-2, 5,7-8").unwrap();
        assert_eq!(v, [0, 1, 2, 5, 7, 8].map(CoreId).to_vec());
        assert_eq!(format_cpu_list(&v), "0-2,5,7-8");
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("1,1").is_err());
        assert!(parse_cpu_list("x").is_err());
        assert!(parse_cpu_list("").is_err());
        assert!(parse_cpu_list("0-99999999").is_err());
        let allowed = [CoreId(0), CoreId(1)];
        assert_eq!(
            Placement::Count(1).resolve(&allowed).unwrap(),
            vec![CoreId(0)]
        );
        assert!(Placement::Count(3).resolve(&allowed).is_err());
    }
}
