//! Whether the clients a certificate chain serves can verify it. A client checks the server's
//! chain only with the signature algorithms it offers (RFC 5246 §7.4.2), and the clients of a key
//! type may offer nothing else: RSA-only stacks (the mbedTLS of Alibaba iotkit v3 has no EC code)
//! cannot check an RSA leaf signed by an EC CA, ECDSA-only ones (tinydtls) no RSA signature.
//! OpenSSL serves such a chain regardless and the handshake fails only on the device, so the
//! server checks each configured chain once at start-up and names what is wrong.

use openssl::nid::Nid;
use openssl::pkey::Id;
use openssl::x509::X509;

/// The signature algorithm family of a key type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Rsa,
    Ecdsa,
}

impl Family {
    fn of_key(id: Id) -> Option<Family> {
        match id {
            Id::RSA => Some(Family::Rsa),
            Id::EC => Some(Family::Ecdsa),
            _ => None,
        }
    }

    /// PKCS #1 v1.5 RSA or ECDSA with any digest; RSASSA-PSS is neither, as TLS 1.2 clients
    /// offer RSA only as PKCS #1 v1.5 (RFC 5246 §7.4.1.4.1).
    fn of_signature(nid: Nid) -> Option<Family> {
        match nid.signature_algorithms()?.pkey {
            Nid::RSAENCRYPTION => Some(Family::Rsa),
            Nid::X9_62_ID_ECPUBLICKEY => Some(Family::Ecdsa),
            _ => None,
        }
    }

    fn clients(self) -> &'static str {
        match self {
            Family::Rsa => "RSA-only clients (signature_algorithms RSA)",
            Family::Ecdsa => "ECDSA-only clients (signature_algorithms ECDSA)",
        }
    }
}

/// What keeps clients of the leaf's key type from verifying `chain` (leaf first): each certificate
/// in it must be signed with that key type's algorithm. One sentence per certificate that is not.
pub fn problems(chain: &[X509]) -> Vec<String> {
    let Some(leaf) = chain.first() else { return Vec::new() };
    let Some(family) = leaf.public_key().ok().and_then(|k| Family::of_key(k.id())) else {
        return Vec::new(); // OpenSSL itself refuses keys it cannot serve
    };
    let mut out = Vec::new();
    for (i, cert) in chain.iter().enumerate() {
        let nid = cert.signature_algorithm().object().nid();
        if Family::of_signature(nid) == Some(family) {
            continue;
        }
        let which = match i {
            0 => "the leaf".to_string(),
            _ => format!("certificate {} ({})", i + 1, common_name(cert)),
        };
        let algorithm =
            nid.long_name().map_or_else(|_| cert.signature_algorithm().object().to_string(), str::to_string);
        out.push(format!("{which} is signed with {algorithm}; {} cannot verify it", family.clients()));
    }
    out
}

fn common_name(cert: &X509) -> String {
    cert.subject_name()
        .entries_by_nid(Nid::COMMONNAME)
        .next()
        .and_then(|e| e.data().to_string().ok())
        .map_or_else(|| "no CN".to_string(), |cn| cn.to_string())
}

#[cfg(test)]
mod tests {
    use openssl::asn1::Asn1Time;
    use openssl::ec::{EcGroup, EcKey};
    use openssl::hash::MessageDigest;
    use openssl::pkey::{PKey, Private};
    use openssl::rsa::Rsa;
    use openssl::x509::{X509Builder, X509NameBuilder};

    use super::*;

    fn ec_key() -> PKey<Private> {
        let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
        PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap()
    }

    fn rsa_key() -> PKey<Private> {
        PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap()
    }

    /// A certificate for `key` named `cn`, signed by `issuer` (its name and key).
    fn cert(cn: &str, key: &PKey<Private>, issuer: Option<(&X509, &PKey<Private>)>) -> X509 {
        let mut name = X509NameBuilder::new().unwrap();
        name.append_entry_by_text("CN", cn).unwrap();
        let name = name.build();
        let mut b = X509Builder::new().unwrap();
        b.set_version(2).unwrap();
        b.set_subject_name(&name).unwrap();
        b.set_issuer_name(issuer.map_or(&*name, |(c, _)| c.subject_name())).unwrap();
        b.set_pubkey(key).unwrap();
        b.set_not_before(&Asn1Time::days_from_now(0).unwrap()).unwrap();
        b.set_not_after(&Asn1Time::days_from_now(1).unwrap()).unwrap();
        b.sign(issuer.map_or(key, |(_, k)| k), MessageDigest::sha256()).unwrap();
        b.build()
    }

    #[test]
    fn a_chain_signed_with_its_leafs_key_type_is_fine() {
        let (ca_key, leaf_key) = (rsa_key(), rsa_key());
        let ca = cert("rsa ca", &ca_key, None);
        assert!(problems(&[cert("localhost", &leaf_key, Some((&ca, &ca_key))), ca]).is_empty());
        let (ca_key, leaf_key) = (ec_key(), ec_key());
        let ca = cert("ec ca", &ca_key, None);
        assert!(problems(&[cert("localhost", &leaf_key, Some((&ca, &ca_key))), ca]).is_empty());
        assert!(problems(&[]).is_empty());
    }

    #[test]
    fn an_rsa_leaf_signed_by_an_ec_ca_is_named() {
        let ca_key = ec_key();
        let ca = cert("nbhub development CA", &ca_key, None);
        let chain = [cert("localhost", &rsa_key(), Some((&ca, &ca_key))), ca];
        assert_eq!(
            problems(&chain),
            [
                "the leaf is signed with ecdsa-with-SHA256; RSA-only clients (signature_algorithms RSA) cannot verify it",
                "certificate 2 (nbhub development CA) is signed with ecdsa-with-SHA256; RSA-only clients \
                 (signature_algorithms RSA) cannot verify it",
            ]
        );
    }

    #[test]
    fn an_ec_leaf_signed_by_an_rsa_ca_is_named() {
        let ca_key = rsa_key();
        let ca = cert("rsa ca", &ca_key, None);
        let chain = [cert("localhost", &ec_key(), Some((&ca, &ca_key)))];
        assert_eq!(
            problems(&chain),
            [
                "the leaf is signed with sha256WithRSAEncryption; ECDSA-only clients (signature_algorithms ECDSA) cannot \
              verify it"
            ]
        );
    }
}
