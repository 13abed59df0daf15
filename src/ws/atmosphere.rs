//! Atmosphere transport framing (PROTOCOL.md §1): the handshake frame, `X` heartbeats and the
//! optional `<length>|` prefix counted in UTF-16 code units. Plain WebSocket clients get none of
//! it.

use bytestring::ByteString;

/// What the client asked for in its query string.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transport {
    /// `X-atmo-protocol=true`: send the handshake frame and `X` heartbeats.
    pub atmo_protocol: bool,
    /// `X-Atmosphere-TrackMessageSize=true`: prefix every frame with its length.
    pub track_size: bool,
}

impl Transport {
    pub fn from_query(query: &str) -> Transport {
        let mut t = Transport::default();
        for pair in query.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let on = v.eq_ignore_ascii_case("true");
            if k.eq_ignore_ascii_case("X-atmo-protocol") {
                t.atmo_protocol = on;
            } else if k.eq_ignore_ascii_case("X-Atmosphere-TrackMessageSize") {
                t.track_size = on;
            }
        }
        t
    }

    /// The first frame of an Atmosphere connection: `<uuid>|<heartbeat-ms>|X|`.
    pub fn handshake(&self, heartbeat_ms: u64) -> Option<ByteString> {
        self.atmo_protocol.then(|| {
            self.frame(ByteString::from(format!(
                "{}|{}|X|",
                uuid::Uuid::new_v4(),
                heartbeat_ms
            )))
        })
    }

    /// Wraps a message for the wire: unchanged, or `<length>|<message>`.
    pub fn frame(&self, msg: ByteString) -> ByteString {
        if !self.track_size {
            return msg;
        }
        let len = if msg.is_ascii() {
            msg.len()
        } else {
            msg.encode_utf16().count()
        };
        ByteString::from(format!("{len}|{msg}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_from_atmosphere_js_query() {
        let t = Transport::from_query("X-Atmosphere-tracking-id=0&X-Atmosphere-Framework=2.3.6-javascript&X-Atmosphere-Transport=websocket&X-Atmosphere-TrackMessageSize=true&Content-Type=application/json&X-atmo-protocol=true");
        assert!(t.atmo_protocol && t.track_size);
        assert_eq!(Transport::from_query(""), Transport::default());
    }

    #[test]
    fn length_prefix_counts_utf16_units() {
        let t = Transport {
            atmo_protocol: true,
            track_size: true,
        };
        assert_eq!(&*t.frame("X".into()), "1|X");
        assert_eq!(&*t.frame("é😀".into()), "3|é😀");
        let hs = t.handshake(30000).unwrap();
        let (len, rest) = hs.split_once('|').unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), rest.len());
        assert!(rest.ends_with("|30000|X|"));
    }
}
