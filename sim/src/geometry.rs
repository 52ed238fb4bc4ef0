//! Where things are on the fabric: PE coordinates, router ports and sets of ports.
//!
//! Coordinates follow the Cerebras SDK: `x` is the column (growing east), `y` the row (growing
//! south), `(0, 0)` is the north-west corner.

use std::fmt;

use serde::Serialize;

/// A PE position: column `x`, row `y`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Coord {
    /// Column, growing east.
    pub x: u32,
    /// Row, growing south.
    pub y: u32,
}

impl Coord {
    /// The PE at column `x`, row `y`.
    pub const fn new(x: u32, y: u32) -> Self {
        Self { x, y }
    }

    /// The neighbour through `port` on a `width x height` fabric, or `None` off the edge (or for
    /// [`Port::Ramp`], which leads to this PE's own core).
    pub fn neighbour(self, port: Port, width: u32, height: u32) -> Option<Coord> {
        let Coord { x, y } = self;
        match port {
            Port::Ramp => None,
            Port::North => y.checked_sub(1).map(|y| Coord::new(x, y)),
            Port::South => (y + 1 < height).then(|| Coord::new(x, y + 1)),
            Port::West => x.checked_sub(1).map(|x| Coord::new(x, y)),
            Port::East => (x + 1 < width).then(|| Coord::new(x + 1, y)),
        }
    }
}

impl fmt::Display for Coord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "({}, {})", self.x, self.y)
    }
}

/// A router port: the link to the PE's own core (`Ramp`) or to one of four neighbours.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Port {
    /// To and from the PE's own core.
    Ramp = 0,
    /// Towards row `y - 1`.
    North = 1,
    /// Towards row `y + 1`.
    South = 2,
    /// Towards column `x + 1`.
    East = 3,
    /// Towards column `x - 1`.
    West = 4,
}

impl Port {
    /// All five ports, in index order.
    pub const ALL: [Port; 5] = [Port::Ramp, Port::North, Port::South, Port::East, Port::West];

    /// Index in [`Port::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The port a wavelet sent out of `self` arrives on at the neighbour (`East` -> `West`).
    /// `Ramp` maps to itself.
    pub const fn opposite(self) -> Port {
        match self {
            Port::Ramp => Port::Ramp,
            Port::North => Port::South,
            Port::South => Port::North,
            Port::East => Port::West,
            Port::West => Port::East,
        }
    }

    /// The SDK's name for the port.
    pub const fn name(self) -> &'static str {
        match self {
            Port::Ramp => "RAMP",
            Port::North => "NORTH",
            Port::South => "SOUTH",
            Port::East => "EAST",
            Port::West => "WEST",
        }
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of ports (a route's `rx` or `tx` set). Several `tx` ports make a hardware multicast.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortSet(u8);

impl PortSet {
    /// No port.
    pub const EMPTY: PortSet = PortSet(0);

    /// The set of the given ports.
    pub fn of(ports: &[Port]) -> Self {
        PortSet(ports.iter().fold(0, |bits, p| bits | (1 << p.index())))
    }

    /// Whether `port` is in the set.
    pub fn contains(self, port: Port) -> bool {
        self.0 & (1 << port.index()) != 0
    }

    /// Whether the set has no port.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The ports in either set.
    pub fn union(self, other: PortSet) -> PortSet {
        PortSet(self.0 | other.0)
    }

    /// Whether the sets share a port.
    pub fn intersects(self, other: PortSet) -> bool {
        self.0 & other.0 != 0
    }

    /// Number of ports in the set.
    pub fn len(self) -> usize {
        self.0.count_ones() as usize
    }

    /// The ports in the set, in index order.
    pub fn iter(self) -> impl Iterator<Item = Port> {
        let mut bits = self.0;
        std::iter::from_fn(move || {
            if bits == 0 {
                return None;
            }
            let i = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            Some(Port::ALL[i])
        })
    }
}

impl From<Port> for PortSet {
    fn from(port: Port) -> Self {
        PortSet::of(&[port])
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.iter().map(Port::name).collect();
        write!(f, "{{{}}}", names.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbours_stop_at_the_edges() {
        let (w, h) = (3, 2);
        let corner = Coord::new(0, 0);
        assert_eq!(corner.neighbour(Port::North, w, h), None);
        assert_eq!(corner.neighbour(Port::West, w, h), None);
        assert_eq!(corner.neighbour(Port::East, w, h), Some(Coord::new(1, 0)));
        assert_eq!(corner.neighbour(Port::South, w, h), Some(Coord::new(0, 1)));
        let far = Coord::new(2, 1);
        assert_eq!(far.neighbour(Port::East, w, h), None);
        assert_eq!(far.neighbour(Port::South, w, h), None);
        assert_eq!(far.neighbour(Port::Ramp, w, h), None);
    }

    #[test]
    fn opposite_is_an_involution_that_swaps_axes_ends() {
        for p in Port::ALL {
            assert_eq!(p.opposite().opposite(), p);
        }
        assert_eq!(Port::East.opposite(), Port::West);
        assert_eq!(Port::North.opposite(), Port::South);
    }

    #[test]
    fn port_sets() {
        let s = PortSet::of(&[Port::Ramp, Port::South]);
        assert!(s.contains(Port::Ramp) && s.contains(Port::South) && !s.contains(Port::East));
        assert_eq!(s.len(), 2);
        assert_eq!(s.to_string(), "{RAMP, SOUTH}");
        assert!(PortSet::EMPTY.is_empty());
    }
}
