//! Links as the agent and the CNI plugin look at them: by name, with their
//! MAC address (`aa:bb:...` as text).

/// A MAC address as text (`aa:bb:...`), and back.
pub fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let bytes: Vec<u8> =
        text.split(':').map(|p| u8::from_str_radix(p, 16)).collect::<Result<_, _>>().ok()?;
    <[u8; 6]>::try_from(bytes.as_slice()).ok()
}

/// A link's index and MAC address (zeros if it has none), if it exists.
#[cfg(feature = "netlink")]
pub async fn find_link(
    handle: &rtnetlink::Handle,
    name: &str,
) -> Result<Option<(u32, [u8; 6])>, rtnetlink::Error> {
    use futures_util::TryStreamExt as _;
    use rtnetlink::packet_route::link::LinkAttribute;

    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(Some(link)) => {
            let mac = link.attributes.iter().find_map(|a| match a {
                LinkAttribute::Address(bytes) => <[u8; 6]>::try_from(bytes.as_slice()).ok(),
                _ => None,
            });
            Ok(Some((link.header.index, mac.unwrap_or_default())))
        }
        Ok(None) => Ok(None),
        // ENODEV: no such link.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_as_text_and_back() {
        let mac = [0x02, 0xab, 0, 1, 2, 0xff];
        assert_eq!(mac_text(&mac), "02:ab:00:01:02:ff");
        assert_eq!(parse_mac(&mac_text(&mac)), Some(mac));
        assert_eq!(parse_mac("02:ab"), None);
    }
}
